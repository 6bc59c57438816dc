"""Packing twins of the CPU kernels: exact round trips, the documented layouts bit by bit, rejection of weights that
do not fit and of corrupt packed tensors, the torch twins (no extension needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefast.ops.sparse24_cpu import (
    pack_sparse24_cpu,
    sparse24_linear_cpu,
    unpack_sparse24_cpu,
)
from sparsefast.ops.sparse_unstructured import (
    VALUE_PADDING,
    cpu_padded_in,
    pack_sparse_unstructured,
    sparse_unstructured_linear_cpu,
    unpack_sparse_unstructured,
    weight_sparsity,
)
from tests.kernels.test_sparse_cpu import random_24, random_unstructured


@pytest.mark.parametrize("shape", [(1, 4), (7, 37), (16, 64), (9, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse24_cpu_round_trip_and_layout(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    w = random_24(*shape, gen).to(dtype)
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


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unstructured_round_trip_and_layout(sparsity, dtype):
    gen = torch.Generator().manual_seed(3)
    w = random_unstructured(9, 45, sparsity, gen).to(dtype)
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


def test_torch_twins_are_dense_with_zeros_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, generator=gen)
    w24, wu = random_24(7, 37, gen), random_unstructured(7, 37, 0.7, gen)
    b = torch.randn(7, generator=gen)
    y24 = sparse24_linear_cpu(x, *pack_sparse24_cpu(w24), b, 7, 37, backend="torch")
    yu = sparse_unstructured_linear_cpu(x, *pack_sparse_unstructured(wu), b, 7, 37, backend="torch")
    assert torch.equal(y24, F.linear(x, w24, b)) and torch.equal(yu, F.linear(x, wu, b))
