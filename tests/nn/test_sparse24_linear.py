"""Sparse24Linear: from_dense, its paths on CPU (the CPU kernel on a derived CPU layout, dense above the table), the
CUDA table chosen at the first CUDA call, kernels called without a second backend selection, and greedy-token
equality of a swapped tiny model on the GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefast.nn import Sparse24Linear, SparsifyConfig, sparsify_
from sparsefast.nn.dispatch import DEFAULT_CPU_DISPATCH
from tests.conftest import tiny_model
from tests.nn.model_helpers import prune_linears, pruned_linear
from tests.ops.sparse_cpu_helpers import assert_within_rule, require_cpu_kernels


def _greedy(model, ids, steps=8):
    """Greedy decode without a KV cache: every step runs the whole sequence (M grows with it)."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_linear(bias):
    lin = pruned_linear(40, 72, None, seed=0, bias=bias)
    sp = Sparse24Linear.from_dense(lin)
    x = torch.randn(3, 5, 72)
    from sparsefast._ext import load_cpu_extension

    assert sp.backend_for(x) == ("cpu" if load_cpu_extension() else "dense")  # CPU kernels for M <= 64
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    x_many = torch.randn(65, 72)  # above the default CPU table: dense F.linear on the unpacked weight
    assert sp.backend_for(x_many) == "dense" and torch.equal(sp(x_many), lin(x_many))
    assert "in_features=72" in repr(sp)


def test_from_dense_rejects_dense_weight():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24Linear.from_dense(nn.Linear(8, 4))


def test_cuda_table_is_chosen_at_the_first_cuda_call():
    layer = Sparse24Linear.from_dense(pruned_linear(8, 16, None, seed=4))
    assert layer.dispatch is None and "chosen at the first CUDA call" in repr(layer)
    assert layer.backend_for(torch.randn(2, 16)) != "cuda" and layer.dispatch is None  # CPU input: no CUDA table


def test_sparse24_linear_runs_the_cpu_kernel_on_cpu():
    require_cpu_kernels()
    lin = pruned_linear(24, 40, None, seed=2)
    sp = Sparse24Linear.from_dense(lin)
    x = torch.randn(4, 40)
    assert sp.backend_for(x) == "cpu" and DEFAULT_CPU_DISPATCH.backend_for(4) == "cpu"
    assert_within_rule(sp(x), x, lin.weight.detach(), lin.bias.detach())
    sp = sp.to(torch.bfloat16)  # derived CPU pack rebuilt for the new dtype
    xb = x.to(torch.bfloat16)
    assert_within_rule(sp(xb), xb, lin.weight.detach().to(torch.bfloat16), lin.bias.detach().to(torch.bfloat16))


def test_kernels_run_without_a_second_backend_selection(monkeypatch):
    """The module's dispatch decides; the functional ops' select_backend must not run again on its paths."""
    def no_selection(*args, **kwargs):
        raise AssertionError("select_backend ran on the nn path")

    monkeypatch.setattr("sparsefast.ops.sparse24.select_backend", no_selection)
    monkeypatch.setattr("sparsefast.ops.sparse24_cpu.select_backend", no_selection)
    lin = pruned_linear(24, 40, None, seed=3)
    sp = Sparse24Linear.from_dense(lin)
    x = torch.randn(4, 40)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)  # the CPU kernel (or dense without it)
    calls = []
    monkeypatch.setattr(sp, "backend_for", lambda x: "cuda")  # decided once per input size: a new size asks it
    monkeypatch.setattr("sparsefast.nn.sparse24_linear.sparse24_matmul_cuda",
                        lambda x, values, meta, n, k: calls.append(x.shape) or x.new_zeros(*x.shape[:-1], n))
    x = torch.randn(5, 40)
    assert torch.equal(sp(x), lin.bias.detach().expand(5, 24)) and calls == [(5, 40)]
    assert torch.equal(sp(x), lin.bias.detach().expand(5, 24)) and len(calls) == 2  # the kept decision


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swap_tiny_llama_gpu_greedy(dtype):
    from sparsefast._ext import load_extension

    if load_extension() is None:
        pytest.skip("sparsefast._C not built")
    model = tiny_model("llama", seed=3, hidden_size=128, intermediate_size=256).to("cuda", dtype)
    prune_linears(model, None)
    ids = torch.randint(0, 256, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = _greedy(model, ids, steps=12)
    with torch.no_grad():
        ref_logits = model(want).logits.float()
    records = sparsify_(model, SparsifyConfig(mode="auto"))  # CUDA layers: Sparse24Linear with the GPU's table
    lin = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    assert len(lin) == len(records) == 2 * 7 and all(r["chosen"] == "sparse24" for r in records.values())
    assert all(m.backend_for(torch.empty(1, 8, m.in_features, device="cuda", dtype=dtype)) == "cuda" for m in lin)
    with torch.no_grad():
        logits = model(want).logits.float()
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # positions that are not numerical near-ties
    assert torch.equal(logits.argmax(-1)[clear], ref_logits.argmax(-1)[clear])
    assert (logits - ref_logits).abs().max() < (0.05 if dtype == torch.float16 else 0.3)
    if bool(clear[:, ids.shape[1] - 1:-1].all()):
        assert torch.equal(_greedy(model, ids, steps=12), want)
