"""sparsefast.ops.dense_cpu: the dense CPU GEMV kernel against its torch twin (F.linear) under the CPU kernels'
tolerance rule (tests/ops/sparse_cpu_helpers.py), on every instruction set, 1 and 2 threads, odd shapes (rows not a
multiple of 8, columns not a multiple of 16), strided weight views and poisoned outputs; and `linear_cpu`, the route
that runs it only for the M where it wins."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from sparsefast.ops.dense_cpu import DENSE_KERNEL_MAX_TOKENS, dense_kernel_takes, dense_linear_cpu, linear_cpu
from sparsefast.ops.int8_rows import quantize_int8_rows
from tests.ops.sparse_cpu_helpers import (
    SHAPES,
    WEIGHT_DTYPES,
    as_stored,
    assert_same_from_threads,
    assert_within_rule,
    available_isas,
    require_cpu_kernels,
    run_all,
)


@pytest.mark.parametrize("shape", SHAPES + ((9, 16), (49, 1536)))
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_dense_linear_cpu_matches_torch(shape, wdtype, xdtype):
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, wdtype, xdtype)).encode()))
    out_f, in_f = shape
    stored, scales, w = as_stored(torch.randn(out_f, in_f, generator=gen), wdtype)
    bias = torch.randn(out_f, generator=gen) if in_f % 2 else None
    x = torch.randn(64, in_f, generator=gen).to(xdtype)
    run_all(lambda xm, isa: dense_linear_cpu(xm, stored, bias, scales=scales, backend="cpu", isa=isa), x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_weight_view_and_leading_dims(dtype):
    """A view of a wider matrix (row stride > in_features, as a slice of a fused weight; 72 columns, not a multiple
    of 16) and x [2, 5, in], fp32 and bf16 weights, every instruction set."""
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(40, 100, generator=gen).to(dtype)
    w = big[3:30, 7:79]  # [27, 72], row stride 100
    x = torch.randn(2, 5, 72, generator=gen)
    for isa in available_isas():
        y = dense_linear_cpu(x, w, None, backend="cpu", isa=isa)
        assert y.shape == (2, 5, 27)
        assert_within_rule(y.reshape(10, 27), x.reshape(10, 72), w.float(), None)


def test_kernel_called_from_several_threads_at_once():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(200, 96, generator=gen)
    xs = [torch.randn(m, 96, generator=gen) for m in (1, 3, 8, 64)]
    assert_same_from_threads(lambda x: dense_linear_cpu(x, w, None, backend="cpu"), xs)


def test_op_passes_opcheck():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(6)
    for w, x in ((torch.randn(24, 48, generator=gen), torch.randn(2, 3, 48, generator=gen)),
                 (torch.randn(24, 48, generator=gen).bfloat16(), torch.randn(1, 48, generator=gen).bfloat16())):
        torch.library.opcheck(torch.ops.sparsefast.dense_linear_cpu.default,
                              (x, w, torch.randn(24, generator=gen), 0, None, False))
    q, scales = quantize_int8_rows(torch.randn(24, 48, generator=gen))
    torch.library.opcheck(torch.ops.sparsefast.dense_linear_cpu.default,
                          (torch.randn(2, 48, generator=gen), q, None, 0, scales, False))


def test_bad_inputs_are_refused_with_the_shape_named():
    require_cpu_kernels()
    with pytest.raises(ValueError, match=r"x \[\.\.\., 5\] does not match weight \(3, 4\)"):
        dense_linear_cpu(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="unit column stride"):
        torch.ops.sparsefast.dense_linear_cpu(torch.randn(2, 4), torch.randn(4, 3).t(), None, 0, None, False)
    with pytest.raises(ValueError, match="CPU kernel does not support"):
        dense_linear_cpu(torch.randn(2, 4).half(), torch.randn(3, 4).half(), backend="cpu")
    assert dense_linear_cpu(torch.randn(2, 4).half(), torch.randn(3, 4).half()).dtype == torch.float16  # torch twin


def test_linear_cpu_runs_the_kernel_only_up_to_the_token_limit():
    """The route: the kernel for M <= DENSE_KERNEL_MAX_TOKENS (any leading dims), F.linear above, for fp16 and for
    weights without unit column stride. The two sum in different orders, so bitwise equality tells which ran (the
    seed is fixed; checked that kernel and F.linear differ on these inputs)."""
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=gen)
    for shape, kernel in (((1, 40), True), ((2, 4, 40), True), ((DENSE_KERNEL_MAX_TOKENS + 1, 40), False)):
        x = torch.randn(*shape, generator=gen)
        by_kernel, by_torch = torch.ops.sparsefast.dense_linear_cpu(x, w, None, 0, None, False), F.linear(x, w)
        assert not torch.equal(by_kernel, by_torch)
        assert dense_kernel_takes(x, w) == kernel
        assert torch.equal(linear_cpu(x, w), by_kernel if kernel else by_torch), shape
    assert not dense_kernel_takes(torch.randn(1, 40).half(), w.half())
    assert not dense_kernel_takes(torch.randn(1, 24), w.t())
    with pytest.raises(ValueError, match="needs its scales"):  # int8 values only with their scales
        linear_cpu(torch.randn(1, 40), w.to(torch.int8))
