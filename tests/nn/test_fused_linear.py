"""fuse_linears: the fused layer computes the parts' outputs side by side, for every kind it fuses (dense, the dense
CPU kernel, 2:4 and unstructured SparseLinear, with a kept dense copy and bias or without); the parts become views of
its buffers (no extra memory) and still compute what they did; what cannot fuse is left alone. The engine with its
fused projections gives the greedy tokens of the model's own forward (tests/serve cover the runner further)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefast.nn import DenseCpuLinear, DispatchTable, SparseLinear, SparsifyConfig, sparsify_
from sparsefast.nn.fused_linear import fuse_linears
from sparsefast.ops.dense_cpu import DENSE_KERNEL_MAX_TOKENS
from sparsefast.ops.int8_rows import SCALE_BUFFER, dequantize_int8_rows, quantize_int8_rows
from sparsefast.serve.engine import GenerationEngine, SamplingParams, build_in_thread
from tests.nn.model_helpers import greedy_generate, prune_linears, pruned_linear
from tests.ops.sparse_cpu_helpers import require_cpu_kernels

ROWS = (24, 8, 16)  # multiples of the 8-row tile, like q/k/v


def _quantized(lin: nn.Linear) -> nn.Linear:
    """`lin` with its weight on the per-row int8 grid and its weight_scale buffer (as prune --quantize int8 leaves
    it)."""
    q, scales = quantize_int8_rows(lin.weight.detach())
    with torch.no_grad():
        lin.weight.copy_(dequantize_int8_rows(q, scales, lin.weight.dtype))
    lin.register_buffer(SCALE_BUFFER, scales)
    return lin


def _parts(kind: str, bias: bool, dtype=torch.float32) -> list[nn.Module]:
    """kind: linear | dense-kernel | 2:4 | unstructured, "+dense": a kept dense copy, "-int8" after the first word:
    int8-quantized parts."""
    base, _, keep = kind.partition("+")
    base, int8 = base.removesuffix("-int8"), base.endswith("-int8")
    sparsity = None if base == "2:4" else 0.6
    lins = [pruned_linear(n, 40, sparsity, seed=i, bias=bias).to(dtype) for i, n in enumerate(ROWS)]
    if int8:
        lins = [_quantized(lin) for lin in lins]
    if base == "linear":
        return lins
    if base == "dense-kernel":
        return [DenseCpuLinear.from_linear(lin) for lin in lins]
    return [SparseLinear.from_dense(lin, base, keep_dense=keep == "dense") for lin in lins]


def _shares_storage(part_tensor: torch.Tensor, fused_tensor: torch.Tensor) -> bool:
    return part_tensor.untyped_storage().data_ptr() == fused_tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "dense-kernel", "2:4", "2:4+dense", "dense-kernel-int8", "2:4-int8",
                                  "2:4-int8+dense", "unstructured", "unstructured+dense", "unstructured-int8"])
def test_fused_layer_equals_its_parts_side_by_side(kind, bias, dtype):
    if kind != "linear":
        require_cpu_kernels()
    parts = _parts(kind, bias, dtype)
    xs = [torch.randn(m, 40).to(dtype) for m in (1, 3, 70)]  # kernel sizes, and a prefill size (dense route)
    with torch.no_grad():
        before = [torch.cat([p(x) for p in parts], -1) for x in xs]
        state = [{k: v.clone() for k, v in p.state_dict().items()} for p in parts]
        fused = fuse_linears(parts)
        assert type(fused) is (type(parts[0]) if kind != "linear" else nn.Linear)
        if "int8" in kind:  # the fused layer runs int8 values with all parts' scales
            q = fused.values if isinstance(fused, SparseLinear) else fused.qweight
            scales = fused.scales if isinstance(fused, SparseLinear) else fused.weight_scale
            assert q.dtype == torch.int8 and scales.shape == (sum(ROWS),)
        assert fused.out_features == sum(ROWS) and fused.in_features == 40
        for x, want in zip(xs, before):
            # sparsefast's kernels (M <= 8) compute each output row as in its part (same kernel, same row order of the
            # sums): equal. F.linear (plain layers, and M = 70) is oneDNN/MKL's GEMM, which may block a fused weight's
            # rows differently from its parts' (1 ulp apart on a Zen 4 in fp32): close.
            exact = kind != "linear" and x.shape[0] <= DENSE_KERNEL_MAX_TOKENS
            tol = {"atol": 0, "rtol": 0} if exact else {}
            torch.testing.assert_close(fused(x), want, **tol)
            torch.testing.assert_close(torch.cat([p(x) for p in parts], -1), want, atol=0, rtol=0)
    for p, saved in zip(parts, state):  # the model's view of its layers: the same tensors' values
        assert p.state_dict().keys() == saved.keys()
        assert all(torch.equal(p.state_dict()[k], v) for k, v in saved.items())
    big = fused.values if isinstance(fused, SparseLinear) else fused.weight
    assert all(_shares_storage(p.values if isinstance(p, SparseLinear) else p.weight, big) for p in parts)


def test_parts_that_cannot_fuse_are_left_alone():
    require_cpu_kernels()
    lin = [pruned_linear(n, 40, None, seed=i) for i, n in enumerate(ROWS)]
    sparse = [SparseLinear.from_dense(x, "2:4") for x in lin]
    odd = SparseLinear.from_dense(pruned_linear(12, 40, None, seed=7), "2:4")  # 12 rows: not whole tiles
    cases = [
        [lin[0]],  # one part
        [lin[0], sparse[1]],  # mixed kinds
        [sparse[0], SparseLinear.from_dense(lin[1], "unstructured")],  # mixed layouts
        [sparse[0], odd],
        [sparse[0], SparseLinear.from_dense(lin[1], "2:4", keep_dense=True)],  # dense copy kept by one only
        [lin[0], pruned_linear(8, 40, None, seed=3, bias=False)],  # bias on one only
        [lin[0], nn.Linear(41, 8)],  # different input widths
        [lin[0], lin[1].to(torch.bfloat16)],  # different dtypes
        [sparse[0], SparseLinear.from_dense(_quantized(pruned_linear(8, 40, None, seed=4)), "2:4")],  # int8 + float
        [DenseCpuLinear.from_linear(lin[0]), DenseCpuLinear.from_linear(_quantized(nn.Linear(40, 8)))],
    ]
    for parts in cases:
        ptrs = [p.values.data_ptr() if isinstance(p, SparseLinear) else p.weight.data_ptr() for p in parts]
        assert fuse_linears(parts) is None
        assert ptrs == [p.values.data_ptr() if isinstance(p, SparseLinear) else p.weight.data_ptr() for p in parts]


@pytest.mark.parametrize("case", ["2:4", "70%", "int8", "2:4-int8"])
def test_engine_with_fused_projections_keeps_greedy_tokens(story_llama_dir, case):
    """The engine's fused q/k/v and gate/up (2:4, unstructured and int8 parts fuse, with every part's scales) give
    the greedy tokens of the model's own forward. "int8", "2:4-int8": prune --quantize int8."""
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(story_llama_dir)
    if case.endswith("int8"):
        pattern, sparsity = ("2:4", None) if case.startswith("2:4") else ("unstructured", 0.0)
        prune(model, MagnitudeConfig(pattern=pattern, sparsity=sparsity, quantize="int8", device="cpu"),
              progress=False)
    else:
        prune_linears(model, None if case == "2:4" else 0.7)
    sparsify_(model, SparsifyConfig(calibrate=False))  # every pruned linear gets its kernel (2:4 or unstructured)
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids)[0, 10:].tolist()
    engine = build_in_thread(lambda: GenerationEngine(model, tok, max_batch=2, max_model_len=64))
    fused = engine.runner.qkv + engine.runner.gate_up
    assert len(fused) == 4 and all(type(f) is (DenseCpuLinear if case == "int8" else SparseLinear) for f in fused)
    if case == "70%":
        assert all(f.layout == "unstructured" for f in fused)
    if case.endswith("int8"):
        scales = [f.scales if isinstance(f, SparseLinear) else f.weight_scale for f in fused]
        assert all(s is not None and s.shape == (f.out_features,) for f, s in zip(fused, scales))
    engine.start()
    try:
        got = engine.generate(ids[0].tolist(), SamplingParams(max_tokens=len(want), temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    assert got == want
    assert greedy_generate(model, ids)[0, 10:].tolist() == want  # the model's own forward, on the re-pointed tensors


def test_dispatch_tables_combine_to_the_kernel_where_every_part_chose_it():
    require_cpu_kernels()
    tables = [DispatchTable(((40, "cpu"), (2**62, "dense"))), DispatchTable(((8, "cpu"), (2**62, "dense"))),
              DispatchTable(((4, "dense"), (64, "cpu"), (2**62, "dense")))]
    parts = [SparseLinear.from_dense(pruned_linear(n, 40, None, seed=i), "2:4", dispatch=t, keep_dense=True)
             for i, (n, t) in enumerate(zip(ROWS, tables))]
    fused = fuse_linears(parts)
    assert fused.dispatch.rows == ((4, "dense"), (8, "cpu"), (2**62, "dense"))
    assert [fused.backend_for(torch.empty(m, 40)) for m in (1, 4, 5, 8, 9, 64)] == ["dense"] * 2 + ["cpu"] * 2 + [
        "dense"] * 2
    same = [SparseLinear.from_dense(pruned_linear(n, 40, None, seed=i), "2:4", dispatch=tables[0])
            for i, n in enumerate(ROWS)]
    assert fuse_linears(same).dispatch is tables[0]
