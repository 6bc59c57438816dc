"""sparsefast.ops.sparse24_cpu: the 2:4 CPU kernel against its torch twin, dense-with-zeros F.linear, and its packing
twin (exact round trip, the documented layout bit by bit, rejection of weights that do not fit and of corrupt packed
tensors; no extension needed).

Tolerance rule (sparse_cpu_helpers.assert_within_rule): error vs an fp64 reference <= 2x the error of torch's
F.linear in the same precision, plus a small atol. Every vector path this CPU has (avx512vbmi, avx512, avx2) and the
scalar path run, with 1 and 2 threads, on fresh random inputs with odd shapes, every M that matters, and poisoned
output memory. In CI the kernel tests fail (not skip) when the extension did not build; SPARSEFAST_NO_COMPILER=1 is
the one way to skip them.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from sparsefast.ops.int8_rows import quantize_int8_rows
from sparsefast.ops.sparse24_cpu import pack_sparse24_cpu, sparse24_linear_cpu, unpack_sparse24_cpu
from tests.ops.sparse_cpu_helpers import (
    SHAPES,
    TOKENS,
    WEIGHT_DTYPES,
    as_stored,
    assert_same_from_threads,
    assert_within_rule,
    opcheck_linear_op,
    random_24,
    require_cpu_kernels,
    run_all,
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_sparse24_linear_cpu_matches_torch(shape, wdtype, xdtype):
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, wdtype, xdtype)).encode()))
    out_f, in_f = shape
    stored, scales, w = as_stored(random_24(out_f, in_f, gen), wdtype)
    bias = torch.randn(out_f, generator=gen) if in_f % 2 else None
    values, meta = pack_sparse24_cpu(stored)
    x = torch.randn(max(TOKENS), in_f, generator=gen).to(xdtype)
    run_all(lambda xm, isa: sparse24_linear_cpu(xm, values, meta, bias, out_f, in_f, scales=scales, backend="cpu",
                                                isa=isa), x, w, bias)


def test_batched_leading_dims_and_strided_input():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(3)
    w = random_24(24, 48, gen)
    values, meta = pack_sparse24_cpu(w)
    x = torch.randn(2, 5, 96, generator=gen)[..., ::2]  # non-contiguous view
    y = sparse24_linear_cpu(x, values, meta, None, 24, 48, backend="cpu")
    assert y.shape == (2, 5, 24)
    assert_within_rule(y.reshape(10, 24), x.reshape(10, 48), w, None)


def test_kernel_called_from_several_threads_at_once():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(7)
    packed = pack_sparse24_cpu(random_24(200, 96, gen))
    xs = [torch.randn(m, 96, generator=gen) for m in (1, 3, 8, 64)]
    assert_same_from_threads(lambda x: sparse24_linear_cpu(x, *packed, None, 200, 96, backend="cpu"), xs)


def test_op_passes_opcheck():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(6)
    opcheck_linear_op(torch.ops.sparsefast.sparse24_linear_cpu.default, pack_sparse24_cpu(random_24(24, 48, gen)),
                      24, 48, gen)
    q, scales = quantize_int8_rows(random_24(24, 48, gen))
    opcheck_linear_op(torch.ops.sparsefast.sparse24_linear_cpu.default, pack_sparse24_cpu(q), 24, 48, gen, scales)


@pytest.mark.parametrize("shape", [(1, 4), (7, 37), (16, 64), (9, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_sparse24_cpu_round_trip_and_layout(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    w = as_stored(random_24(*shape, gen), dtype)[0] if dtype == torch.int8 else random_24(*shape, gen).to(dtype)
    values, meta = pack_sparse24_cpu(w)
    tiles, blocks = -(-shape[0] // 8), -(-shape[1] // 32)
    assert values.shape == (tiles, blocks, 8, 16) and values.dtype == dtype
    assert meta.shape == (tiles, blocks, 8) and meta.dtype == torch.int32
    assert torch.equal(unpack_sparse24_cpu(values, meta, *shape), w)
    wp = F.pad(w, (0, 32 * blocks - shape[1], 0, 8 * tiles - shape[0]))
    flat_values = values.flatten()  # memory order: tile, block, row, value
    for n in range(8 * tiles):  # values[t, b, r, 2g + s] = W[8t + r, 32b + 4g + i_s]; i_s = bits 2j, 2j+1 of meta
        t, r = divmod(n, 8)
        for b in range(blocks):
            word = int(meta[t, b, r]) & 0xFFFFFFFF
            for g in range(8):
                kept = [(word >> (2 * (2 * g + s))) & 3 for s in range(2)]
                assert kept[0] < kept[1]
                cols = [32 * b + 4 * g + i for i in range(4)]
                assert all(wp[n, c] == 0 for i, c in enumerate(cols) if i not in kept)
                start = ((t * blocks + b) * 8 + r) * 16 + 2 * g
                assert flat_values[start:start + 2].tolist() == [wp[n, cols[i]].item() for i in kept]


def test_sparse24_cpu_rejects_and_detects():
    w = random_24(6, 32, torch.Generator().manual_seed(1))
    w[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 3, group 2 \(columns 8..11\) has 3 nonzeros"):
        pack_sparse24_cpu(w)
    values, meta = pack_sparse24_cpu(random_24(6, 32, torch.Generator().manual_seed(2)))
    bad = meta.clone()
    bad[0, 0, 4] = bad[0, 0, 4] & ~(0xF << 12) | (0x5 << 12)  # group 3 of row 4: positions (1, 1)
    with pytest.raises(ValueError, match="meta row 4, group 3 does not hold 2 ascending positions"):
        unpack_sparse24_cpu(values, bad, 6, 32)
    with pytest.raises(ValueError, match="values shape"):
        unpack_sparse24_cpu(values[..., :-1], meta, 6, 32)
    with pytest.raises(ValueError, match="meta must be int32"):
        unpack_sparse24_cpu(values, meta.to(torch.int64), 6, 32)


def test_torch_twin_is_dense_with_zeros_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, generator=gen)
    w24 = random_24(7, 37, gen)
    b = torch.randn(7, generator=gen)
    y24 = sparse24_linear_cpu(x, *pack_sparse24_cpu(w24), b, 7, 37, backend="torch")
    assert torch.equal(y24, F.linear(x, w24, b))
