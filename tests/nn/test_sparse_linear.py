"""SparseLinear (CPU layouts): from_dense, its paths by the table (kernel, dense above it), the path decided once per
input size and again after .to(), and its kernel called without a second backend selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefast.nn import SparseLinear
from tests.nn.model_helpers import pruned_linear
from tests.ops.sparse_cpu_helpers import assert_within_rule, require_cpu_kernels


@pytest.mark.parametrize("layout,sparsity", [("2:4", None), ("unstructured", 0.7)])
def test_sparse_linear_matches_linear(layout, sparsity):
    require_cpu_kernels()
    lin = pruned_linear(40, 72, sparsity, seed=0)
    sp = SparseLinear.from_dense(lin, layout)
    assert sp.dense is None and f"layout={layout!r}" in repr(sp)
    for shape in ((3, 5, 72), (1, 72), (70, 72)):  # the default table: kernel up to 64 tokens, dense above
        x = torch.randn(shape)
        assert sp.backend_for(x) == ("cpu" if x.numel() // 72 <= 64 else "dense")
        assert_within_rule(sp(x).reshape(-1, 40), x.reshape(-1, 72), lin.weight.detach(), lin.bias.detach())
    with torch.no_grad():
        assert torch.equal(sp.dense_weight(), lin.weight)
    with pytest.raises(ValueError, match="expected 72"):
        sp(torch.randn(2, 71))


def test_sparse_linear_path_is_decided_again_after_to():
    """forward() caches its path per input size; a dtype change of the layer (here fp16 weights, which the kernels
    do not take, then back to fp32) must decide it again, not keep the dense fallback."""
    require_cpu_kernels()
    lin = pruned_linear(24, 48, 0.7, seed=5)
    sp = SparseLinear.from_dense(lin, "unstructured").half()
    x = torch.randn(2, 48)
    sp(x.half())
    assert [kind for kind, _ in sp._routes.values()] == ["dense"]
    sp.float()
    y = sp(x)
    assert [kind for kind, _ in sp._routes.values()] == ["cpu"]
    assert_within_rule(y, x, lin.weight.detach().half().float(), lin.bias.detach().half().float())


def test_sparse_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, group 0"):
        SparseLinear.from_dense(nn.Linear(8, 4), "2:4")
    with pytest.raises(ValueError, match="layout must be"):
        SparseLinear(8, 4, "csr", ())


@pytest.mark.parametrize("layout,sparsity", [("2:4", None), ("unstructured", 0.7)])
def test_kernel_runs_without_a_second_backend_selection(monkeypatch, layout, sparsity):
    """The module's dispatch decides; the functional op's select_backend must not run again on its path."""
    require_cpu_kernels()

    def no_selection(*args, **kwargs):
        raise AssertionError("select_backend ran on the nn path")

    monkeypatch.setattr("sparsefast.ops.sparse24_cpu.select_backend", no_selection)
    monkeypatch.setattr("sparsefast.ops.sparse_unstructured.select_backend", no_selection)
    lin = pruned_linear(24, 48, sparsity, seed=6)
    sp = SparseLinear.from_dense(lin, layout)
    x = torch.randn(3, 48)
    assert sp.backend_for(x) == "cpu"
    assert_within_rule(sp(x), x, lin.weight.detach(), lin.bias.detach())
