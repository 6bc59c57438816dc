"""SparseLinear (CPU layouts), the measured CPU dispatch, swap_linear_with_sparse, and greedy-token equality of a
swapped real tiny llama (2:4 and unstructured) with its dense-with-zeros self."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefast.nn import Sparse24Linear, SparseLinear, choose_sparse_layer, swap_linear_with_sparse
from sparsefast.nn.cpu_dispatch import DEFAULT_CPU_DISPATCH, table_from_timings
from sparsefast.ops.sparse24 import to_sparse24_by_magnitude
from tests.kernels.test_sparse_cpu import assert_within_rule, require_cpu_kernels


def _linear(out_f: int, in_f: int, sparsity: float | None, seed: int, bias: bool = True) -> nn.Linear:
    """sparsity None: 2:4 by magnitude; else unstructured with that fraction of zeros."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        if sparsity is None:
            lin.weight.copy_(to_sparse24_by_magnitude(lin.weight))
        else:
            lin.weight[torch.rand(lin.weight.shape) < sparsity] = 0
    return lin


@pytest.mark.parametrize("layout,sparsity", [("2:4", None), ("unstructured", 0.7)])
def test_sparse_linear_matches_linear(layout, sparsity):
    require_cpu_kernels()
    lin = _linear(40, 72, sparsity, seed=0)
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
    lin = _linear(24, 48, 0.7, seed=5)
    sp = SparseLinear.from_dense(lin, "unstructured").half()
    x = torch.randn(2, 48)
    sp(x.half())
    assert list(sp._routes.values()) == [None]  # dense F.linear
    sp.float()
    y = sp(x)
    assert [r is not None for r in sp._routes.values()] == [True]  # the kernel's call (None: dense F.linear)
    assert_within_rule(y, x, lin.weight.detach().half().float(), lin.bias.detach().half().float())


def test_sparse_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, group 0"):
        SparseLinear.from_dense(nn.Linear(8, 4), "2:4")
    with pytest.raises(ValueError, match="layout must be"):
        SparseLinear(8, 4, "csr", ())


def test_table_from_timings_needs_the_margin():
    table = table_from_timings({1: (1.0, 2.0), 4: (1.0, 2.0), 16: (3.0, 2.0), 64: (0.96, 1.0)}, "t")
    assert table.rows == ((10, "cpu"), (2**62, "dense"))  # 0.96 of dense is inside the noise margin: dense
    assert [table.backend_for(m) for m in (1, 10, 11, 500)] == ["cpu", "cpu", "dense", "dense"]


def test_choose_sparse_layer_is_measured_and_never_worse_than_its_table():
    require_cpu_kernels()
    lin = _linear(256, 512, 0.9, seed=1)
    layer, record = choose_sparse_layer(lin)
    assert record["candidates"]["unstructured"]["timings"].keys() == {1, 4, 16, 64}
    if record["chosen"] == "dense":
        assert layer is lin
        return
    assert isinstance(layer, SparseLinear) and layer.layout == record["chosen"]
    assert layer.dispatch.source.startswith("measured here")
    for m, t in record["candidates"][layer.layout]["timings"].items():
        assert layer.dispatch.backend_for(m) == ("cpu" if t["kernel_ms"] <= 0.95 * t["dense_ms"] else "dense")
    assert (layer.dense is not None) == any(b == "dense" for _, b in layer.dispatch.rows)
    x = torch.randn(3, 512)
    assert_within_rule(layer(x), x, lin.weight.detach(), lin.bias.detach())


def test_sparse24_linear_runs_the_cpu_kernel_on_cpu():
    require_cpu_kernels()
    lin = _linear(24, 40, None, seed=2)
    sp = Sparse24Linear.from_dense(lin)
    x = torch.randn(4, 40)
    assert sp.backend_for(x) == "cpu" and DEFAULT_CPU_DISPATCH.backend_for(4) == "cpu"
    assert_within_rule(sp(x), x, lin.weight.detach(), lin.bias.detach())
    sp = sp.to(torch.bfloat16)  # derived CPU pack rebuilt for the new dtype
    xb = x.to(torch.bfloat16)
    assert_within_rule(sp(xb), xb, lin.weight.detach().to(torch.bfloat16), lin.bias.detach().to(torch.bfloat16))


def _greedy(model: nn.Module, ids: torch.Tensor, steps: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def _prune(model: nn.Module, sparsity: float | None) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and "lm_head" not in name:
                if sparsity is None:
                    mod.weight.copy_(to_sparse24_by_magnitude(mod.weight))
                else:
                    cut = mod.weight.abs().flatten().kthvalue(int(sparsity * mod.weight.numel())).values
                    mod.weight[mod.weight.abs() <= cut] = 0


@pytest.mark.parametrize("sparsity,layout", [(None, "2:4"), (0.7, "unstructured")])
def test_swapped_story_llama_generates_the_same_greedy_tokens(story_llama_dir, sparsity, layout):
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    _prune(model, sparsity)
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    want = _greedy(model, ids)
    records = swap_linear_with_sparse(model, calibrate=False)  # every pruned linear gets its kernel
    assert len(records) == 2 * 7 and all(r["chosen"] == layout for r in records.values())
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14 and all(m.backend_for(torch.empty(1, m.in_features)) == "cpu" for m in swapped)
    assert isinstance(model.lm_head, nn.Linear)  # dense head left alone
    assert torch.equal(_greedy(model, ids), want)


def test_calibrated_swap_keeps_greedy_tokens(story_llama_dir):
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    _prune(model, None)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    want = _greedy(model, ids, steps=8)
    records = swap_linear_with_sparse(model, lambda name, mod: "mlp" in name)
    assert set(records) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert all(r["chosen"] in ("dense", "2:4", "unstructured") for r in records.values())
    assert torch.equal(_greedy(model, ids, steps=8), want)
    x = torch.randn(2, 128)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and torch.equal(q(x), F.linear(x, q.weight, q.bias))


def test_load_with_sparse_auto_swaps_a_mask_pruned_checkpoint(tmp_path, story_llama_dir):
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsefast

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    _prune(model, 0.7)
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(story_llama_dir).save_pretrained(tmp_path / "pruned")
    with pytest.raises(ValueError, match="sparse must be one of"):
        sparsefast.load(tmp_path / "missing", sparse="yes")  # checked before anything is read
    dense, _ = sparsefast.load(tmp_path / "pruned")
    swapped, _ = sparsefast.load(tmp_path / "pruned", sparse="auto")
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_greedy(swapped, ids, steps=8), _greedy(dense, ids, steps=8))
