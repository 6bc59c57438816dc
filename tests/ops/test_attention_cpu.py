"""sparsefast.ops.attention_cpu: the CPU decode-attention kernel against its torch twin and against torch SDPA over
the gathered, masked cache rows (what the batched runner computed before), on every instruction set, 1 and 2
threads, grouped-query and plain heads (groups whole and split between tasks), head sizes with and without the
vector paths, rows at different positions (position 0 too), poisoned outputs; opcheck; and the errors."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from sparsefast.ops.attention_cpu import (
    decode_attention_cpu,
    decode_attention_fits,
    decode_attention_ref,
    decode_attention_takes,
)
from tests.ops.sparse_cpu_helpers import available_isas, poison, require_cpu_kernels

TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _case(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, rows: int = 5, max_len: int = 70):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((heads, kv_heads, head_dim, dtype)).encode()))
    keys = torch.randn(rows, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    values = torch.randn(rows, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([3, 0, 4])  # not in order, not contiguous
    positions = torch.tensor([69, 0, 17])  # the last position, the first, one in between
    q = (torch.randn(3, heads, head_dim, generator=gen) * 2).to(dtype)
    return q, keys, values, slots, positions


def _sdpa_over_gathered_rows(q, keys, values, slots, positions, scale):
    """What LlamaBatchRunner computed before the kernel: SDPA over the gathered rows with a position mask."""
    length = int(positions.max()) + 1
    mask = (torch.arange(length)[None, :] <= positions[:, None]).view(len(slots), 1, 1, length)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], keys[slots, :, :length].float(),
                                         values[slots, :, :length].float(), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (8, 2, 32), (16, 2, 128), (6, 2, 16): the AVX-512 path's groups of several heads, whole (1 thread) and split between
# tasks (2 threads, 3 sequences x 2 KV heads: each group in 2 parts; groups of 3 heads in parts of 1 and 2)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (6, 2, 12), (2, 1, 8), (3, 1, 24),
                                                     (8, 2, 32), (16, 2, 128), (6, 2, 16)])
def test_decode_attention_matches_twin_and_sdpa(dtype, heads, kv_heads, head_dim):
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(heads, kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    ref = decode_attention_ref(q, keys, values, slots, positions, scale)
    torch.testing.assert_close(ref.float(), _sdpa_over_gathered_rows(q, keys, values, slots, positions, scale),
                               **TOL[dtype])
    threads = torch.get_num_threads()
    try:
        for isa in available_isas():
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                poison(tuple(q.shape))
                out = decode_attention_cpu(q, keys, values, slots, positions, scale, backend="cpu", isa=isa)
                assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
                torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype],
                                           msg=lambda m: f"isa {isa}, {n_threads} threads: {m}")
    finally:
        torch.set_num_threads(threads)


def test_long_context_runs_on_both_threads_and_matches():
    """A context long enough that the tasks are split between threads."""
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(8, 2, 64, torch.float32, rows=2, max_len=2048)
    slots, positions = torch.tensor([1, 0]), torch.tensor([2047, 1500])
    q = q[:2]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = decode_attention_cpu(q, keys, values, slots, positions, 0.125, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    want = decode_attention_ref(q, keys, values, slots, positions, 0.125)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_hundreds_apart_match_the_twin(dtype):
    """Scores spread over hundreds (softmax numerators from 1 down to far below the smallest normal float): the
    vector exponentials and their clamp give the twin's output, on every instruction set."""
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(8, 2, 64, dtype)
    q = (q.float() * 40).to(dtype)
    ref = decode_attention_ref(q, keys, values, slots, positions, 0.125)
    for isa in available_isas():
        out = decode_attention_cpu(q, keys, values, slots, positions, 0.125, backend="cpu", isa=isa)
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"isa {isa}: {m}")


@pytest.mark.parametrize("head_dim", [16, 48, 64])
def test_lengths_at_the_score_blocks_edges(head_dim):
    """Rows of 16, 32, 1 and 17 keys (the AVX-512 path reduces scores 16 keys at a time; whole and partial blocks),
    head sizes with and without the inner loop's tail, on every instruction set and 1 and 2 threads."""
    require_cpu_kernels()
    q, keys, values, _, _ = _case(6, 2, head_dim, torch.float32)
    q = torch.cat([q, q[:1]])
    slots, positions = torch.tensor([3, 0, 4, 1]), torch.tensor([15, 31, 0, 16])
    ref = decode_attention_ref(q, keys, values, slots, positions, 0.3)
    threads = torch.get_num_threads()
    try:
        for isa in available_isas():
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                out = decode_attention_cpu(q, keys, values, slots, positions, 0.3, backend="cpu", isa=isa)
                torch.testing.assert_close(out, ref, **TOL[torch.float32],
                                           msg=lambda m: f"isa {isa}, {n_threads} threads: {m}")
    finally:
        torch.set_num_threads(threads)


def test_a_nan_query_gives_nan_as_the_twin_does():
    """A NaN in one query head makes that head's output NaN on every instruction set (never a finite average of
    the values), and leaves the other heads alone."""
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(8, 2, 64, torch.float32)
    q[1, 5, 7] = float("nan")
    ref = decode_attention_ref(q, keys, values, slots, positions, 0.125)
    assert ref[1, 5].isnan().all()
    for isa in available_isas():
        out = decode_attention_cpu(q, keys, values, slots, positions, 0.125, backend="cpu", isa=isa)
        assert out[1, 5].isnan().all(), f"isa {isa}"
        torch.testing.assert_close(out, ref, **TOL[torch.float32], equal_nan=True, msg=lambda m: f"isa {isa}: {m}")


def test_reads_only_each_rows_own_positions():
    """Keys beyond a row's position and other rows' entries do not change its output (poisoned with NaN/inf)."""
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(4, 2, 32, torch.float32)
    scale = 0.2
    expected = {isa: decode_attention_cpu(q, keys, values, slots, positions, scale, backend="cpu", isa=isa)
                for isa in available_isas()}
    for slot, pos in zip(slots.tolist(), positions.tolist()):
        keys[slot, :, pos + 1:] = float("inf")
        values[slot, :, pos + 1:] = float("nan")
    keys[[1, 2]] = float("nan")  # rows no sequence reads
    for isa, want in expected.items():
        out = decode_attention_cpu(q, keys, values, slots, positions, scale, backend="cpu", isa=isa)
        assert torch.equal(out, want), isa


def test_opcheck():
    require_cpu_kernels()
    for dtype in (torch.float32, torch.bfloat16):
        q, keys, values, slots, positions = _case(6, 2, 16, dtype)
        torch.library.opcheck(torch.ops.sparsefast.decode_attention_cpu, (q, keys, values, slots, positions, 0.25, 0))


def test_errors():
    require_cpu_kernels()
    q, keys, values, slots, positions = _case(4, 2, 16, torch.float32)
    op = torch.ops.sparsefast.decode_attention_cpu
    with pytest.raises(ValueError, match="position 70 is outside the cache"):
        op(q, keys, values, slots, torch.tensor([1, 70, 2]), 0.25, 0)
    with pytest.raises(ValueError, match="slot 5 is not a cache row"):
        op(q, keys, values, torch.tensor([0, 5, 1]), positions, 0.25, 0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        op(q[:, :3], keys, values, slots, positions, 0.25, 0)
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        op(q, keys.bfloat16(), values.bfloat16(), slots, positions, 0.25, 0)
    with pytest.raises(ValueError, match="one entry per sequence"):
        op(q, keys, values, slots[:2], positions, 0.25, 0)
    with pytest.raises(ValueError, match="decode_attention_cpu: q must be"):
        decode_attention_cpu(q[0], keys, values, slots, positions, 0.25)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of the cache's 2 KV heads"):
        decode_attention_cpu(q[:, :3], keys, values, slots, positions, 0.25)  # before the twin too
    with pytest.raises(ValueError, match="head_dim must equal q's"):
        op(q[:, :, :0], keys[..., :0], values[..., :0], slots, positions, 0.25, 0)
    empty = op(q[:0], keys, values, slots[:0], positions[:0], 0.25, 0)  # no sequences: an empty result
    assert empty.shape == (0, 4, 16)
    # what the kernel does not take runs the twin under auto, and is refused when the kernel is forced
    assert not decode_attention_takes(q.shape[1], keys.double())
    assert not decode_attention_takes(3, keys)  # 3 query heads over 2 KV heads
    assert not decode_attention_fits(q, keys.bfloat16())  # q's dtype is not the cache's
    out = decode_attention_cpu(q.double(), keys.double(), values.double(), slots, positions, 0.25)
    torch.testing.assert_close(out, decode_attention_ref(q.double(), keys.double(), values.double(), slots,
                                                          positions, 0.25))
    with pytest.raises(ValueError, match="does not support this input"):
        decode_attention_cpu(q.double(), keys.double(), values.double(), slots, positions, 0.25, backend="cpu")


def test_a_prebuilt_extension_from_older_sources_is_refused_with_the_reason(monkeypatch):
    """A `sparsefast._cpu` built before an op existed (a pull without reinstalling): the CPU kernels report
    unavailable with the fix, once, instead of every caller failing on the missing op."""
    import sparsefast._ext as ext

    require_cpu_kernels()
    monkeypatch.setattr(ext, "CPU_OPS", (*ext.CPU_OPS, "an_op_this_build_lacks"))
    ext.load_cpu_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="predates this version of sparsefast"):
            assert ext.load_cpu_extension() is False
        assert "an_op_this_build_lacks" in ext.cpu_extension_error()
    finally:
        monkeypatch.undo()
        ext.load_cpu_extension.cache_clear()
        assert ext.load_cpu_extension() and ext.cpu_extension_error() is None
