"""SparseGPT against a direct, unblocked OBS computation (Frantar & Alistarh 2023, eqs. for w_q removal)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.config import SparseGPTConfig
from sparsefast.prune.base import max_nonzeros_per_group
from sparsefast.prune.sparsegpt import SparseGPTPruner, damped_inverse_cholesky, sparsegpt_prune_weight


def obs_reference(w: torch.Tensor, h: torch.Tensor, *, sparsity: float, nm, blocksize: int, percdamp: float):
    """Unblocked OBS in float64 from the textbook formulas, same column order and mask rule as SparseGPT:
    mask chosen per `blocksize` (unstructured) / per M-group (N:M) from ε_c = w_c² / [H_{F_c}⁻¹]_cc, where F_c are
    the columns not yet processed; pruning weight q of a row: w -= w_q/[H⁻¹]_qq · H⁻¹[q, :]; then row/col q is
    removed from H⁻¹ by the Schur update H⁻¹ -= H⁻¹[:, q] H⁻¹[q, :] / H⁻¹[q, q]."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)  # indices: global columns; processed columns get zeroed rows/cols
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    group = blocksize if nm is None else nm[1]
    for q in range(cols):
        if q % group == 0:
            # denominators [H_{F_c}⁻¹]_cc for every column c of the group, by removing q..c-1 from a copy
            g1 = min(q + group, cols)
            tmp = hinv.clone()
            denom = torch.empty(g1 - q, dtype=torch.float64)
            for c in range(q, g1):
                denom[c - q] = tmp[c, c]
                tmp = tmp - torch.outer(tmp[:, c], tmp[c, :]) / tmp[c, c]
            score = w[:, q:g1] ** 2 / denom[None, :]
            if nm is None:
                k = int(score.numel() * sparsity)
                sub = torch.zeros(score.numel(), dtype=torch.bool)
                sub[torch.sort(score.flatten(), stable=True).indices[:k]] = True
                mask[:, q:g1] = sub.view_as(score)
            else:
                n, m = nm
                idx = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
                mask[:, q:g1].scatter_(1, idx, True)  # the slice is a view: writes into mask
        for r in range(rows):
            if mask[r, q]:
                w[r] -= w[r, q] / hinv[q, q] * hinv[q]
                w[r, q] = 0.0
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return w, mask


def random_problem(rows=8, cols=16, tokens=64, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    x[:, list(dead)] = 0
    return w, 2 * x.double().T @ x.double() / 4


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.3), ((2, 4), 0.5), ((1, 4), 0.75), ((4, 8), 0.5)])
@pytest.mark.parametrize("blocksize", [8, 16, 128])
def test_matches_unblocked_obs(nm, sparsity, blocksize):
    w, h = random_problem(seed=blocksize)
    if nm is not None and blocksize % nm[1]:
        pytest.skip("blocksize must be a multiple of M")
    ref_w, ref_mask = obs_reference(w, h, sparsity=sparsity, nm=nm, blocksize=blocksize, percdamp=0.01)
    out, notes = sparsegpt_prune_weight(w, h, sparsity=sparsity, nm=nm, blocksize=blocksize, percdamp=0.01)
    assert out.dtype == w.dtype and notes["retries"] == 0
    assert torch.equal(out == 0, ref_mask)
    torch.testing.assert_close(out.double(), ref_w, rtol=0, atol=1e-5)


def test_float64_hessian_is_tight_and_dead_inputs():
    w, h = random_problem(rows=6, cols=24, seed=3, dead=(5, 17))
    ref_w, ref_mask = obs_reference(w, h, sparsity=0.5, nm=None, blocksize=8, percdamp=0.01)
    out, notes = sparsegpt_prune_weight(w.double(), h, sparsity=0.5, blocksize=8)
    assert notes["dead_inputs"] == 2
    assert torch.equal(out == 0, ref_mask) and (out[:, [5, 17]] == 0).all()
    torch.testing.assert_close(out, ref_w, rtol=0, atol=1e-10)


def test_reduces_reconstruction_error_vs_magnitude():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: OBS updates matter
    h = 2 * x.T @ x / 512
    out, _ = sparsegpt_prune_weight(w, h, sparsity=0.5, blocksize=32)
    mag = w.clone()
    mag[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    err_sgpt = ((out - w) @ x.T).pow(2).sum()
    err_mag = ((mag - w) @ x.T).pow(2).sum()
    assert err_sgpt < 0.8 * err_mag


def test_damping_raised_when_cholesky_fails():
    # one negative eigenvalue: 0.01·mean(diag) does not make it positive definite, 0.1·mean(diag) does
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -0.02]))
    u, notes = damped_inverse_cholesky(h.clone(), percdamp=0.01)
    assert notes["retries"] >= 1 and notes["percdamp"] == pytest.approx(0.01 * 10 ** notes["retries"])
    assert torch.isfinite(u).all()
    with pytest.raises(RuntimeError, match="Cholesky failed"):
        damped_inverse_cholesky(-torch.eye(4), percdamp=0.01, max_retries=2)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "3:8"])
def test_pruner_patterns_on_linear(pattern):
    torch.manual_seed(1)
    lin = torch.nn.Linear(48, 20)
    cfg = SparseGPTConfig(pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None, blocksize=16)
    p = SparseGPTPruner(cfg)
    p.start_layer({"fc": lin})
    for _ in range(3):
        p.add_batch("fc", torch.randn(2, 10, 48))
    stats = p.prune("fc", lin)
    p.end_layer()
    if pattern == "unstructured":
        per_block = sum(int(20 * c * 0.6) for c in (16, 16, 16))
        assert stats["zeros"] == per_block  # exact per block of 16 columns (no dead inputs here)
    else:
        n, m = map(int, pattern.split(":"))
        assert max_nonzeros_per_group(lin.weight, m) <= n
        assert stats["zeros"] == 20 * 48 * (m - n) // m
    assert stats["damping"]["retries"] == 0


def test_nan_activation_is_clear_error():
    p = SparseGPTPruner(SparseGPTConfig())
    lin = torch.nn.Linear(8, 4)
    p.start_layer({"fc": lin})
    x = torch.randn(1, 3, 8)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        p.add_batch("fc", x)


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), ((2, 4), 0.5)])
def test_fixed_mask_reproduces_own_selection(nm, sparsity):
    # SparseGPT's own final zero pattern, given back as a fixed mask, yields the same weights: the selection and the
    # update are separable
    w, h = random_problem(rows=8, cols=32, seed=5)
    out, _ = sparsegpt_prune_weight(w.double(), h, sparsity=sparsity, nm=nm, blocksize=16)
    again, _ = sparsegpt_prune_weight(w.double(), h, sparsity=0.0, blocksize=16, mask=out == 0)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-12)


def test_fixed_mask_update_beats_plain_masking():
    torch.manual_seed(1)
    w = torch.randn(16, 64, dtype=torch.float64)
    x = torch.randn(256, 64, dtype=torch.float64) @ torch.randn(64, 64, dtype=torch.float64)
    h = 2 * x.T @ x / 256
    mask = torch.rand(16, 64) < 0.5
    out, _ = sparsegpt_prune_weight(w, h, sparsity=0.0, blocksize=32, mask=mask)
    assert torch.equal(out == 0, mask)  # exactly the given zeros, nothing else
    plain = w.masked_fill(mask, 0.0)
    assert ((out - w) @ x.T).pow(2).sum() < 0.9 * ((plain - w) @ x.T).pow(2).sum()
    with pytest.raises(ValueError, match="mask must be bool"):
        sparsegpt_prune_weight(w, h, sparsity=0.0, mask=mask.float())
