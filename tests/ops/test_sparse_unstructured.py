"""sparsefast.ops.sparse_unstructured: the unstructured CPU kernel against its torch twin, dense-with-zeros F.linear,
its `auto` dispatch and forced-backend errors, and its packing twin (exact round trip, the documented layout bit by
bit, detection of corrupt packed tensors and bad weights; no extension needed). The tolerance rule and the runs over
instruction sets, threads and token counts are those of tests/ops/test_sparse24_cpu.py (sparse_cpu_helpers)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from sparsefast.ops.int8_rows import quantize_int8_rows
from sparsefast.ops.sparse_unstructured import (
    VALUE_PADDING,
    cpu_padded_in,
    pack_sparse_unstructured,
    sparse_unstructured_linear_cpu,
    unpack_sparse_unstructured,
    weight_sparsity,
)
from tests.ops.sparse_cpu_helpers import (
    SHAPES,
    TOKENS,
    WEIGHT_DTYPES,
    as_stored,
    assert_same_from_threads,
    available_isas,
    opcheck_linear_op,
    random_24,
    random_unstructured,
    require_cpu_kernels,
    run_all,
)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
def test_unstructured_linear_cpu_matches_torch(sparsity, shape, wdtype):
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((sparsity, shape, wdtype)).encode()))
    out_f, in_f = shape
    stored, scales, w = as_stored(random_unstructured(out_f, in_f, sparsity, gen), wdtype)
    bias = torch.randn(out_f, generator=gen)
    packed = pack_sparse_unstructured(stored)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(max(TOKENS), in_f, generator=gen).to(xdtype)
        run_all(lambda xm, isa: sparse_unstructured_linear_cpu(xm, *packed, bias, out_f, in_f, scales=scales,
                                                               backend="cpu", isa=isa), x, w, bias)


@pytest.mark.parametrize("wdtype", [torch.int8, torch.bfloat16])
def test_vbmi_path_returns_the_avx512_paths_bits(wdtype):
    """avx512vbmi's several-rows expand (int8 widened as q * 2^24, the sum scaled back) gives the avx512 path's output
    bits: every shape, including rows < 8 and columns < 16, every token count, fp32 and bf16 activations."""
    require_cpu_kernels()
    if "avx512vbmi" not in available_isas():
        pytest.skip("this CPU has no AVX-512 VBMI/VBMI2")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("vbmi-bits", wdtype)).encode()))
    for out_f, in_f in (*SHAPES, (3, 15), (40, 1536)):
        stored, scales, _ = as_stored(random_unstructured(out_f, in_f, 0.5, gen), wdtype)
        packed = pack_sparse_unstructured(stored)
        bias = torch.randn(out_f, generator=gen)
        for xdtype in (torch.float32, torch.bfloat16):
            x_full = torch.randn(max(TOKENS), in_f, generator=gen).to(xdtype)
            for m in TOKENS:
                plain, vbmi = (sparse_unstructured_linear_cpu(x_full[:m], *packed, bias, out_f, in_f, scales=scales,
                                                              backend="cpu", isa=isa)
                               for isa in ("avx512", "avx512vbmi"))
                assert torch.equal(plain, vbmi), f"{wdtype} {out_f}x{in_f} M={m} x {xdtype}"


def test_auto_dispatch_and_forced_backend_errors():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(4)
    w = random_unstructured(9, 40, 0.7, gen)
    packed = pack_sparse_unstructured(w)
    x16 = torch.randn(3, 40, generator=gen).half()
    y = sparse_unstructured_linear_cpu(x16, *packed, None, 9, 40)  # fp16: auto falls back to the torch twin
    assert torch.equal(y, F.linear(x16, w.half()))
    with pytest.raises(ValueError, match="CPU kernel does not support"):
        sparse_unstructured_linear_cpu(x16, *packed, None, 9, 40, backend="cpu")
    with pytest.raises(ValueError, match="features"):
        sparse_unstructured_linear_cpu(torch.randn(2, 41), *packed, None, 9, 40)
    with pytest.raises(ValueError, match="instruction set"):
        sparse_unstructured_linear_cpu(torch.randn(2, 40), *packed, None, 9, 40, isa="neon")


def test_kernel_called_from_several_threads_at_once():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(7)
    packed = pack_sparse_unstructured(random_unstructured(200, 96, 0.6, gen))
    xs = [torch.randn(m, 96, generator=gen) for m in (1, 3, 8, 64)]
    assert_same_from_threads(lambda x: sparse_unstructured_linear_cpu(x, *packed, None, 200, 96, backend="cpu"), xs)


def test_op_passes_opcheck():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(6)
    packed = pack_sparse_unstructured(random_24(24, 48, gen))  # any weight: the 2:4 one of test_sparse24_cpu.py
    opcheck_linear_op(torch.ops.sparsefast.sparse_unstructured_linear_cpu.default, packed, 24, 48, gen)
    q, scales = quantize_int8_rows(random_unstructured(24, 48, 0.5, gen))
    opcheck_linear_op(torch.ops.sparsefast.sparse_unstructured_linear_cpu.default, pack_sparse_unstructured(q),
                      24, 48, gen, scales)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_unstructured_round_trip_and_layout(sparsity, dtype):
    gen = torch.Generator().manual_seed(3)
    w = as_stored(random_unstructured(9, 45, sparsity, gen), dtype)[0]
    values, mask, offsets = pack_sparse_unstructured(w)
    nnz = int((w != 0).sum())
    tiles, chunks = 2, cpu_padded_in(45) // 16
    assert values.shape == (nnz + VALUE_PADDING,) and torch.all(values[nnz:] == 0)
    assert offsets.tolist() == [0, int((w[:8] != 0).sum()), nnz]
    assert mask.shape == (tiles, chunks, 8) and mask.dtype == torch.int16
    assert torch.equal(unpack_sparse_unstructured(values, mask, offsets, 9, 45), w)
    wp = F.pad(w, (0, 16 * chunks - 45, 0, 16 - 9))
    stream = []  # the documented order: tile, chunk, row, column; bit j of mask[t, c, r] <-> column 16c + j stored
    for t in range(tiles):
        for c in range(chunks):
            for r in range(8):
                word = int(mask[t, c, r]) & 0xFFFF
                cols = [16 * c + j for j in range(16) if word >> j & 1]
                assert cols == [16 * c + j for j in range(16) if wp[8 * t + r, 16 * c + j] != 0]
                stream += [wp[8 * t + r, col].item() for col in cols]
    assert values[:nnz].tolist() == stream
    assert abs(weight_sparsity(w) - (1 - nnz / w.numel())) < 1e-12


def test_unstructured_detects_corruption_and_bad_weights():
    values, mask, offsets = pack_sparse_unstructured(random_unstructured(13, 20, 0.5, torch.Generator().manual_seed(4)))
    bad = offsets.clone()
    bad[1:] += 1
    with pytest.raises(ValueError, match=r"tile 0 \(rows 0..7\): mask holds"):
        unpack_sparse_unstructured(torch.cat((values, values[:1])), mask, bad, 13, 20)
    with pytest.raises(ValueError, match="mask must be int16"):
        unpack_sparse_unstructured(values, mask.to(torch.int32), offsets, 13, 20)
    with pytest.raises(ValueError, match="2-D"):
        pack_sparse_unstructured(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        pack_sparse_unstructured(torch.zeros(2, 2, dtype=torch.int32))


def test_unpack_steps_over_a_fused_layers_padding():
    """A fused layer's packed tensors (sparsefast.nn.fused_linear): its parts' value streams joined whole, each with
    its 16 zeros of padding, and tile offsets that step over them: unpack gives the parts' rows one after the other,
    and a nonzero in such a gap is reported as corruption of the tile it follows."""
    gen = torch.Generator().manual_seed(6)
    ws = [random_unstructured(n, 20, 0.5, gen) for n in (16, 8)]
    (v0, m0, o0), (v1, m1, o1) = (pack_sparse_unstructured(w) for w in ws)
    values, mask = torch.cat((v0, v1)), torch.cat((m0, m1))
    offsets = torch.cat((o0[:-1], o1 + v0.numel()))
    assert int(offsets[2] - offsets[1]) == int(o0[2] - o0[1]) + 16  # part 0's last tile, then its padding
    assert torch.equal(unpack_sparse_unstructured(values, mask, offsets, 24, 20), torch.cat(ws))
    bad = values.clone()
    bad[v0.numel() - 1] = 1.0  # the last element of part 0's padding
    with pytest.raises(ValueError, match=r"tile 1 \(rows 8..15\).*corrupt"):
        unpack_sparse_unstructured(bad, mask, offsets, 24, 20)


def test_torch_twin_is_dense_with_zeros_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, generator=gen)
    wu = random_unstructured(7, 37, 0.7, gen)
    b = torch.randn(7, generator=gen)
    yu = sparse_unstructured_linear_cpu(x, *pack_sparse_unstructured(wu), b, 7, 37, backend="torch")
    assert torch.equal(yu, F.linear(x, wu, b))
