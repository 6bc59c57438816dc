"""Packing twin of the 2:4 kernels: exact round trip, the documented fragment layout element by element,
padding, rejection of non-2:4 weights, and the torch matmul twin (CPU)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.ops.sparse24 import (
    check_sparse24,
    pack_sparse24,
    padded_shape,
    sparse24_matmul,
    sparse24_matmul_ref,
    to_sparse24_by_magnitude,
    unpack_sparse24,
)


def random_sparse24(n: int, k: int, dtype=torch.float16, seed: int = 0, keep_prob: float = 1.0) -> torch.Tensor:
    """Random 2:4 weight; keep_prob < 1 also drops some kept values (groups with 0 or 1 nonzero)."""
    g = torch.Generator().manual_seed(seed)
    k4 = -(-k // 4) * 4
    w = torch.randn(n, k4, generator=g).to(dtype)
    w = to_sparse24_by_magnitude(w)
    if keep_prob < 1.0:
        w = w * (torch.rand(n, k4, generator=g) < keep_prob).to(dtype)
    return w[:, :k].contiguous()


def spec_unpack(values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Scalar re-reading of the documented layout (independent of the vectorised unpack)."""
    n_p, k_p = padded_shape(n, k)
    w = torch.zeros(n_p, k_p, dtype=values.dtype)
    for rb in range(n_p // 16):
        for kt in range(k_p // 32):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for e in range(8):
                    ch, rh, cs = e // 4, (e // 2) % 2, e % 2
                    row, grp = rb * 16 + g + 8 * rh, (ch * 8 + 2 * t + cs) // 2  # group in the k tile
                    h, p, q = kt % 2, grp // 4, grp % 4
                    word = int(meta[rb, kt // 2, 4 * g + 2 * h + p]) & 0xFFFFFFFF
                    nib = (word >> (16 * rh + 4 * q)) & 0xF
                    pos = (nib >> (2 * cs)) & 3
                    w[row, kt * 32 + 4 * grp + pos] = values[rb, kt, 8 * lane + e]
    return w[:n, :k]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(16, 64), (37, 200), (1, 8), (130, 1000), (64, 4096)])
def test_round_trip_exact(n, k, dtype):
    w = random_sparse24(n, k, dtype, seed=n * 7 + k, keep_prob=0.8)
    values, meta = pack_sparse24(w)
    n_p, k_p = padded_shape(n, k)
    assert values.shape == (n_p // 16, k_p // 32, 256) and values.dtype == dtype
    assert meta.shape == (n_p // 16, k_p // 64, 32) and meta.dtype == torch.int32
    assert torch.equal(unpack_sparse24(values, meta, n, k), w)


@pytest.mark.parametrize("n,k", [(16, 64), (40, 136)])
def test_layout_matches_documented_spec(n, k):
    w = random_sparse24(n, k, seed=3, keep_prob=0.7)
    values, meta = pack_sparse24(w)
    assert torch.equal(spec_unpack(values, meta, n, k), w)


def test_metadata_positions_are_ascending_and_valid():
    w = random_sparse24(48, 192, seed=5, keep_prob=0.5)  # many groups with 0 or 1 nonzeros
    _, meta = pack_sparse24(w)
    words = meta.to(torch.int64) & 0xFFFFFFFF
    nibs = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)])
    assert bool(((nibs & 3) < (nibs >> 2)).all()), "every nibble must list two distinct ascending positions"


def test_padding_rules():
    n, k = 20, 72  # N_p = 32, K_p = 128
    w = random_sparse24(n, k, seed=1)
    values, meta = pack_sparse24(w)
    dense_p = spec_unpack(values, meta, 32, 128)
    assert torch.equal(dense_p[:n, :k], w)
    assert not dense_p[n:].any() and not dense_p[:, k:].any()
    # padded rows: every metadata half-word is 0x4444 (kept positions 0, 1)
    last_rb = meta[1].to(torch.int64) & 0xFFFFFFFF  # rows 16..31, rows 20..31 are padding
    g = torch.arange(32) // 4
    high = (last_rb >> 16) & 0xFFFF  # rows 24..31: all padding
    assert bool((high == 0x4444).all())
    low_pad = (last_rb & 0xFFFF)[:, g >= 4]  # rows 20..23
    assert bool((low_pad == 0x4444).all())


def test_ties_and_zero_groups():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 3.0]]).half()
    values, meta = pack_sparse24(w)
    assert torch.equal(unpack_sparse24(values, meta, 1, 16), w)
    magn = to_sparse24_by_magnitude(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert torch.equal(magn, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))  # ties drop the lower columns


def test_rejects_non_24_naming_first_group():
    w = random_sparse24(8, 64, seed=2)
    w[5, 17] = w[5, 18] = w[5, 19] = w[5, 16] = 1.0
    w[6, 0:3] = 1.0
    with pytest.raises(ValueError, match=r"row 5, group 4 \(columns 16\.\.19\) has 4 nonzeros \(2 offending"):
        pack_sparse24(w)
    with pytest.raises(ValueError, match="2-D"):
        check_sparse24(torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        check_sparse24(torch.zeros(4, 4, dtype=torch.int32))


def test_rejects_mismatched_packed_shapes():
    values, meta = pack_sparse24(random_sparse24(16, 64))
    with pytest.raises(ValueError, match="does not match"):
        unpack_sparse24(values, meta, 32, 64)
    with pytest.raises(ValueError, match="in_features"):
        sparse24_matmul(torch.randn(2, 32).half(), values, meta, 16, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_twin_matches_dense(dtype):
    w = random_sparse24(29, 136, dtype, seed=11)
    values, meta = pack_sparse24(w)
    x = torch.randn(2, 3, 136).to(dtype)
    y = sparse24_matmul(x, values, meta, 29, 136, backend="torch")
    assert y.shape == (2, 3, 29)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert torch.equal(sparse24_matmul_ref(x, values, meta, 29, 136), y)


def test_forced_cuda_backend_on_cpu_raises():
    values, meta = pack_sparse24(random_sparse24(16, 64))
    with pytest.raises(ValueError, match="CUDA"):
        sparse24_matmul(torch.randn(1, 64).half(), values, meta, 16, 64, backend="cuda")
