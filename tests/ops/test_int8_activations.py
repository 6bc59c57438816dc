"""int8 activations (dynamic W8A8: per token and 32-column block) for int8 weights: the quantizer and the torch twin
`int8_activation_linear` against the definition, and the CPU kernels of the three layouts
(csrc/cpu/linear_int8_act_cpu.cpp) against an fp64 evaluation of the same quantized product (within twice the twin's
fp32 error) for every shape, token count, thread count, x dtype and bias; refusals; opcheck; calls from several
threads."""

from __future__ import annotations

import pytest
import torch

from sparsefast.ops.dense_cpu import dense_linear_cpu
from sparsefast.ops.int8_rows import (
    dequantize_int8_activations,
    int8_activation_linear,
    quantize_int8_activations,
    quantize_int8_rows,
)
from sparsefast.ops.sparse24_cpu import int8_activation_kernels, pack_sparse24_cpu, sparse24_linear_cpu
from sparsefast.ops.sparse_unstructured import pack_sparse_unstructured, sparse_unstructured_linear_cpu
from tests.ops.sparse_cpu_helpers import (
    SHAPES,
    TOKENS,
    assert_same_from_threads,
    assert_within_rule,
    poison,
    random_24,
    random_unstructured,
    require_cpu_kernels,
)

LAYOUTS = ("2:4", "unstructured", "dense")
KERNEL_SHAPES = (*SHAPES, (24, 1024), (9, 65), (16, 1536))  # + 64-column tails and SmolLM2's longest rows


def _weight(layout: str, out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    if layout == "2:4":
        return random_24(out_features, in_features, gen)
    if layout == "unstructured":
        return random_unstructured(out_features, in_features, 0.5, gen)
    return torch.randn(out_features, in_features, generator=gen)


def _call(layout: str, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """x, backend -> y through the layout's functional op with int8 activations."""
    n, k = q.shape
    if layout == "2:4":
        packed = pack_sparse24_cpu(q)
        return lambda x, backend: sparse24_linear_cpu(x, *packed, bias, n, k, scales=scales, int8_activations=True,
                                                      backend=backend)
    if layout == "unstructured":
        packed = pack_sparse_unstructured(q)
        return lambda x, backend: sparse_unstructured_linear_cpu(x, *packed, bias, n, k, scales=scales,
                                                                 int8_activations=True, backend=backend)
    return lambda x, backend: dense_linear_cpu(x, q, bias, scales=scales, int8_activations=True, backend=backend)


def require_int8_activation_kernels() -> None:
    require_cpu_kernels()
    if not int8_activation_kernels():
        pytest.skip("this CPU has no AVX-512 VNNI + VBMI (instruction set avx512vbmi): the torch twin runs instead")


def _dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, in] as the kernels see it."""
    return dequantize_int8_activations(*quantize_int8_activations(x))


def test_quantizer_is_the_row_rule_per_32_column_block():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, generator=gen)
    x[1, 32:64] = 0  # a zero block: scale 1
    x[2, 5] = 40.0  # an outlier rounds only its own block coarsely
    q, xs = quantize_int8_activations(x)
    assert q.shape == (3, 70) and q.dtype == torch.int8 and xs.shape == (3, 3)
    for b, (c0, c1) in enumerate(((0, 32), (32, 64), (64, 70))):
        want_q, want_s = quantize_int8_rows(x[:, c0:c1])
        assert torch.equal(q[:, c0:c1], want_q) and torch.equal(xs[:, b], want_s)
    assert xs[1, 1] == 1 and xs[2, 0] == 40 / 127 and xs[2, 1] < 0.1
    with pytest.raises(ValueError, match="must be 2-D"):
        quantize_int8_activations(x[0])


def test_twin_is_the_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 40, generator=gen)
    x[1, 2] = 0  # a zero token: outputs = bias
    q, scales = quantize_int8_rows(torch.randn(7, 40, generator=gen))
    bias = torch.randn(7, generator=gen)
    y = int8_activation_linear(x, q, scales, bias)
    xq, xs = quantize_int8_activations(x.reshape(-1, 40))
    dots = [xq[:, c0:c1].double() @ q[:, c0:c1].double().T for c0, c1 in ((0, 32), (32, 40))]  # exact integers
    want = (dots[0] * xs[:, :1].double() + dots[1] * xs[:, 1:].double()) * scales.double() + bias.double()
    assert y.shape == (5, 3, 7) and y.dtype == torch.float32
    torch.testing.assert_close(y.reshape(15, 7).double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[1, 2], bias)
    assert int8_activation_linear(x.bfloat16(), q, scales, bias).dtype == torch.bfloat16


def test_twin_error_is_the_activation_rounding():
    """|y - the weight-only output| <= Σ_k |W[row, k]| · xs[t, block of k] / 2 (each x off by at most half a step)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 576, generator=gen)
    x[:, 7] *= 30  # an outlier channel: the per-block scales keep it from coarsening the other blocks
    q, scales = quantize_int8_rows(torch.randn(64, 576, generator=gen))
    w = q.float() * scales[:, None]
    y = int8_activation_linear(x, q, scales)
    step = quantize_int8_activations(x)[1].repeat_interleave(32, dim=1)
    bound = (step / 2) @ w.abs().T * (1 + 1e-4) + 1e-4
    err = (y - x @ w.T).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # the activations were really rounded


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_kernels_match_the_quantized_product(layout, shape):
    """fp32 x: within twice the twin's (F.linear's) error of the fp64 product of the dequantized activations and
    weight; bf16 x: the fp32 result on the same (exactly widened) values, rounded to bf16."""
    require_int8_activation_kernels()
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout) * 100 + KERNEL_SHAPES.index(shape))
    n, k = shape
    q, scales = quantize_int8_rows(_weight(layout, n, k, gen))
    w = q.float() * scales[:, None]
    x_full = torch.randn(max(TOKENS), k, generator=gen) * torch.rand(max(TOKENS), 1, generator=gen) * 4
    x_full[2] = 0  # a zero token
    threads = torch.get_num_threads()
    try:
        for bias in (None, torch.randn(n, generator=gen)):
            call = _call(layout, q, scales, bias)
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                for m in TOKENS:
                    poison((m, n))
                    x = x_full[:m]
                    y = call(x, "cpu")
                    assert torch.isfinite(y).all(), f"{layout} {shape} M={m}: unwritten outputs"
                    assert_within_rule(y, _dequantized_activations(x), w, bias)
                    xb = x.bfloat16()  # widened exactly: the fp32 path on the same values, rounded once to bf16
                    yb = call(xb, "cpu")
                    assert yb.dtype == torch.bfloat16 and torch.equal(yb, call(xb.float(), "cpu").bfloat16())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_from_several_threads_at_once(layout):
    require_int8_activation_kernels()
    gen = torch.Generator().manual_seed(3)
    q, scales = quantize_int8_rows(_weight(layout, 96, 576, gen))
    call = _call(layout, q, scales, torch.randn(96, generator=gen))
    assert_same_from_threads(lambda x: call(x, "cpu"), [torch.randn(m, 576, generator=gen) for m in (1, 2, 5)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ops_pass_opcheck(layout):
    require_int8_activation_kernels()
    gen = torch.Generator().manual_seed(4)
    q, scales = quantize_int8_rows(_weight(layout, 24, 96, gen))
    bias = torch.randn(24, generator=gen)
    for x in (torch.randn(2, 3, 96, generator=gen), torch.randn(1, 96, generator=gen).bfloat16()):
        if layout == "2:4":
            args = (x, *pack_sparse24_cpu(q), bias, 24, 96, 0, scales, True)
            op = torch.ops.sparsefast.sparse24_linear_cpu
        elif layout == "unstructured":
            args = (x, *pack_sparse_unstructured(q), bias, 24, 96, 0, scales, True)
            op = torch.ops.sparsefast.sparse_unstructured_linear_cpu
        else:
            args = (x, q, bias, 0, scales, True)
            op = torch.ops.sparsefast.dense_linear_cpu
        torch.library.opcheck(op, args)


def test_float_weights_are_refused():
    gen = torch.Generator().manual_seed(5)
    w = random_24(16, 64, gen)
    x = torch.randn(1, 64, generator=gen)
    with pytest.raises(ValueError, match="int8 activations need int8 weights"):
        sparse24_linear_cpu(x, *pack_sparse24_cpu(w), None, 16, 64, int8_activations=True)
    with pytest.raises(ValueError, match="int8 activations need int8 weights"):
        dense_linear_cpu(x, w, int8_activations=True, backend="torch")


def test_the_op_refuses_a_level_without_the_kernels():
    require_int8_activation_kernels()
    gen = torch.Generator().manual_seed(6)
    q, scales = quantize_int8_rows(torch.randn(16, 64, generator=gen))
    x = torch.randn(1, 64, generator=gen)
    with pytest.raises(ValueError, match="int8 activations run at instruction set"):
        torch.ops.sparsefast.dense_linear_cpu(x, q, None, 3, scales, True)  # avx512: no VNNI/VBMI path
    with pytest.raises(ValueError, match="int8 activations need int8 values"):
        torch.ops.sparsefast.dense_linear_cpu(x, q.float(), None, 0, None, True)
    # through the functional op a forced lower level takes the torch twin
    y = dense_linear_cpu(x, q, scales=scales, int8_activations=True, isa="avx512")
    assert torch.equal(y, int8_activation_linear(x, q, scales))
