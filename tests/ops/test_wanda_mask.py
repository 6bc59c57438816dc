"""Triton Wanda masks (kernels/wanda_mask.py) against the torch twin wanda_mask_ref: exact equality, ties included.

CPU: the kernels run under TRITON_INTERPRET=1 on small odd shapes. GPU (-m gpu): the real LLaMA layer shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sparsefast.bench.shapes import all_shapes  # noqa: E402
from sparsefast.ops.wanda_mask import wanda_mask, wanda_mask_ref, wanda_prune_  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SHAPES = ((1, 1), (1, 17), (7, 1), (5, 97), (3, 131), (2, 1000))
NM_CASES = ((2, 4), (4, 8), (1, 4), (2, 8))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
interp = pytest.mark.skipif(DEV == "cuda" or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="CPU interpreter tests need TRITON_INTERPRET=1 set before triton is imported")


def _inputs(rows: int, cols: int, dtype: torch.dtype, ties: bool, seed: int, device: str = DEV):
    g = torch.Generator(device=device).manual_seed(seed)
    if ties:  # few distinct keys: whole runs of equal (key, ·) decided by the column order alone
        w = torch.randint(-2, 3, (rows, cols), generator=g, device=device).to(dtype)
        s = torch.randint(0, 3, (cols,), generator=g, device=device).float()
    else:
        w = torch.randn(rows, cols, generator=g, device=device).to(dtype)
        s = torch.rand(cols, generator=g, device=device) * 10
    return w, s


def _check_mask(w, s, **pattern):
    expect = wanda_mask_ref(w, s, **pattern)
    got = wanda_mask(w, s, backend="triton", **pattern)
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, expect), f"mask differs in {int((got != expect).sum())} places for {pattern}"
    return expect


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_unstructured_equals_ref(dtype, shape, ties):
    w, s = _inputs(*shape, dtype, ties, seed=shape[0] * 1000 + shape[1])
    for sparsity in (0.0, 0.5, 0.7):
        expect = _check_mask(w, s, sparsity=sparsity)
        assert (expect.sum(1) == int(shape[1] * sparsity)).all()


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_nm_equals_ref(dtype, ties):
    for rows, cols in ((1, 8), (7, 24), (5, 136)):
        w, s = _inputs(rows, cols, dtype, ties, seed=rows + cols)
        for n, m in NM_CASES:
            expect = _check_mask(w, s, n=n, m=m)
            assert (expect.view(rows, -1, m).sum(2) == m - n).all()


@interp
@pytest.mark.parametrize("n,m", [(1, 3), (3, 5), (5, 32), (31, 32)])
def test_nm_any_group_size(n, m):
    w, s = _inputs(6, 3 * m, torch.bfloat16, ties=True, seed=m)
    _check_mask(w, s, n=n, m=m)


@interp
def test_all_equal_keys_prune_lowest_columns():
    w = torch.full((3, 10), 0.5)
    s = torch.ones(10)
    mask = wanda_mask(w, s, sparsity=0.3, backend="triton")
    assert mask[:, :3].all() and not mask[:, 3:].any()
    mask = wanda_mask(w, s, n=1, m=5, backend="triton")
    assert mask.view(3, 2, 5)[:, :, :4].all() and not mask.view(3, 2, 5)[:, :, 4].any()


@interp
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_signed_zero_negative_scale_and_nan_key():
    """-0.0 ties with +0.0, a negative s orders below zero, inf·0 = NaN sorts last: torch.sort's float order."""
    w = torch.tensor([[1.0, -0.0, 2.0, 0.0, 1e20, -3.0, 0.5, 1.0]])
    s = torch.tensor([-0.0, 1.0, -2.0, 0.0, 0.0, 1.0, -1.0, 3.0])
    for sparsity in (0.25, 0.5, 0.75):
        _check_mask(w, s, sparsity=sparsity)
    for n, m in ((1, 2), (2, 4), (3, 8)):
        _check_mask(w, s, n=n, m=m)


@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_weight_and_in_place_prune(dtype):
    base, s = _inputs(24, 13, dtype, ties=True, seed=7)
    w = base.t()  # [13, 24] with strides (1, 13)
    s = torch.rand(24) * 3
    _check_mask(w, s, sparsity=0.5)
    _check_mask(w, s, n=2, m=4)
    for pattern in ({"sparsity": 0.7}, {"n": 1, "m": 4}):
        expect = w.masked_fill(wanda_mask_ref(w, s, **pattern), 0)
        got = w.clone()
        assert wanda_prune_(got, s, backend="triton", **pattern) is got
        assert torch.equal(got, expect)
        strided = base.clone().t()
        wanda_prune_(strided, s, backend="triton", **pattern)
        assert torch.equal(strided, expect)


@interp
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises(bad):
    w, s = _inputs(4, 16, torch.float16, ties=False, seed=1)
    w_bad = w.clone()
    w_bad[2, 5] = bad
    for pattern in ({"sparsity": 0.5}, {"n": 2, "m": 4}):
        with pytest.raises(ValueError, match="NaN or inf"):
            wanda_mask(w_bad, s, backend="triton", **pattern)
        before = w_bad.clone()
        with pytest.raises(ValueError, match="NaN or inf"):
            wanda_prune_(w_bad, s, backend="triton", **pattern)
        assert torch.equal(before.nan_to_num(), w_bad.nan_to_num()), "check_finite must raise before writing"
        work = w_bad.clone()
        with pytest.raises(ValueError, match="left unchanged"):
            wanda_prune_(work, s, backend="triton", check_finite=False, **pattern)
        assert torch.equal(work[2].nan_to_num(), w_bad[2].nan_to_num())
        if "sparsity" in pattern:  # rows are independent programs: clean rows are pruned (N:M skips whole tiles)
            assert torch.equal(work[0], w[0].masked_fill(wanda_mask_ref(w, s, **pattern)[0], 0))
        s_bad = s.clone()
        s_bad[3] = bad
        with pytest.raises(ValueError, match="act_sq_norm"):
            wanda_mask(w, s_bad, backend="triton", **pattern)


@interp
def test_backend_selection_and_errors(monkeypatch):
    w, s = _inputs(3, 128, torch.float32, ties=False, seed=3)
    with pytest.raises(ValueError, match="not implemented"):
        wanda_mask(w, s, sparsity=0.5, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        wanda_mask(w, s, sparsity=0.5, backend="fast")
    with pytest.raises(ValueError, match="M <= 32"):
        wanda_mask(w, s, n=2, m=64, backend="triton")
    assert torch.equal(wanda_mask(w, s, n=2, m=64), wanda_mask_ref(w, s, n=2, m=64))  # auto → torch
    monkeypatch.setenv("SPARSEFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="M <= 32"):
        wanda_mask(w, s, n=2, m=64)
    monkeypatch.delenv("SPARSEFAST_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        wanda_mask(w, s, sparsity=0.5, backend="triton")
    assert torch.equal(wanda_mask(w, s, sparsity=0.5), wanda_mask_ref(w, s, sparsity=0.5))  # auto → torch


GPU_SHAPES = sorted({(o, i) for _, _, o, i in all_shapes()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"{o}x{i}" for o, i in GPU_SHAPES])
def test_gpu_llama_shapes_bf16(shape):
    w, s = _inputs(*shape, torch.bfloat16, ties=False, seed=shape[0] + shape[1], device="cuda")
    _check_mask(w, s, sparsity=0.5)
    _check_mask(w, s, n=2, m=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_gpu_dtypes_ties_in_place(dtype, ties):
    for shape in ((4096, 11008), (37, 1031)):
        w, s = _inputs(*shape, dtype, ties=ties, seed=shape[1], device="cuda")
        for pattern in ({"sparsity": 0.7}, {"n": 4, "m": 8}):
            expect = _check_mask(w, s, **pattern)
            got = w.clone()
            wanda_prune_(got, s, backend="triton", **pattern)
            assert torch.equal(got, w.masked_fill(expect, 0))
