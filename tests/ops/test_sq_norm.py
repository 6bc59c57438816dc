"""Triton activation norms (kernels/sq_norm.py) against an fp64 reference: Σ_tokens x² per input channel.

Tolerance: the fp32 kernel may differ from the exact (fp64) sum by fp32 rounding of a sum of non-negative terms,
|err| ≤ c·n·2⁻²⁴·Σx² with n the number of terms; we allow rtol = 4·n·2⁻²⁴ (a loose worst case that
a wrong kernel — a missed tile, a doubled split, a dropped square — exceeds by orders of magnitude), plus 1e-30.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sparsefast.bench.shapes import MODELS  # noqa: E402
from sparsefast.ops.sq_norm import sq_norm_accumulate, sq_norm_accumulate_ref  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
interp = pytest.mark.skipif(DEV == "cuda" or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="CPU interpreter tests need TRITON_INTERPRET=1 set before triton is imported")


def _check(x: torch.Tensor, acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    acc0 = (torch.rand(x.shape[-1], generator=g) * 5).to(acc_dtype).to(x.device)
    acc = acc0.clone()
    out = sq_norm_accumulate(acc, x, backend="triton")
    assert out is acc and acc.dtype == acc_dtype
    exact = sq_norm_accumulate_ref(acc0.double().clone(), x.double())
    terms = x.numel() // max(x.shape[-1], 1) + 1
    tol = 4 * terms * 2.0 ** -24 * exact.abs() + 1e-30
    assert ((acc.double() - exact).abs() <= tol).all(), float((acc.double() - exact).abs().max())
    return acc


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 33, 130), (300, 5), (97, 257)])
def test_matches_fp64(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    _check(x)


@interp
def test_fp64_accumulator_strided_input_and_determinism():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(130, 70, generator=g, dtype=torch.float32)
    x = base.t()[:, 1:]  # [70, 129], strides (1, 70): not contiguous
    acc = _check(x, torch.float64)
    again = _check(x, torch.float64)
    assert torch.equal(acc, again)


@interp
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e20])
def test_nonfinite_or_overflow_raises_and_leaves_acc(bad):
    x = torch.randn(40, 9)
    x[17, 4] = bad  # 1e20² overflows fp32
    acc = torch.ones(9)
    with pytest.raises(ValueError, match="NaN or inf"):
        sq_norm_accumulate(acc, x, backend="triton")
    assert torch.equal(acc, torch.ones(9))


@interp
def test_backend_selection_and_errors(monkeypatch):
    x = torch.randn(5, 8, dtype=torch.float64)
    acc = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        sq_norm_accumulate(acc, x, backend="triton")
    sq_norm_accumulate(acc, x)  # auto → torch for float64 input
    assert torch.allclose(acc, (x * x).sum(0))
    with pytest.raises(ValueError, match="not implemented"):
        sq_norm_accumulate(acc, x, backend="cuda")
    with pytest.raises(ValueError, match="acc must be"):
        sq_norm_accumulate(torch.zeros(7), x.float(), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sq_norm_accumulate(torch.zeros(8), x.float(), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", sorted({i for d in MODELS.values() for _, i in d.values()}))
def test_gpu_calibration_shapes(dtype, width):
    """One calibration batch of 8 × 2048 tokens at every LLaMA input width."""
    x = torch.randn(8, 2048, width, device="cuda").to(dtype)
    _check(x)
