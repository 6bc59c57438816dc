"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

For a linear with input X (tokens × in) the layer-wise problem min ‖WX − ŴX‖² has Hessian H = 2XXᵀ/n (n = number
of calibration sequences; the scale does not change the result since damping is relative). Algorithm per linear:
  1. dead inputs (H_jj = 0): set H_jj = 1 and W[:, j] = 0 (those weights never see a nonzero input);
  2. damping: H += λI with λ = percdamp · mean(diag H);
  3. U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Row j of U is [H_{F_j}]⁻¹[j, j:] / √[H_{F_j}⁻¹]_jj where F_j =
     columns j.. still unpruned, so U_jj² is the OBS denominator after columns < j were processed;
  4. columns left to right in blocks of `blocksize` (lazy batch updates): the OBS error of a weight is
     ε = w² / U_jj²; pruned weights q get the update W[:, j:] -= (w_q / U_qq) · U[q, j:] (equivalent to the OBS
     update w -= w_q/[H⁻¹]_qq · H⁻¹_{:,q} with row/column q removed from H⁻¹ afterwards);
  5. adaptive mask selection:
     - unstructured: at the start of each block of `blocksize` columns, over the whole block (all rows × block
       columns, as in the reference implementation) exactly k = int(rows·cols_in_block·sparsity) weights of lowest ε
       are pruned. Exact count per block, hence ≈ sparsity per linear (the floor per block can make it slightly
       lower; dead input columns make it higher); rows are NOT individually exact;
     - N:M: at the first column of each M-group, the M − N weights of lowest ε in that group of every row.
  Ties: stable sort, the lower (flat, row-major) index is pruned first.
  With a fixed `mask` (e.g. Wanda's) step 5 is skipped and only the OBS updates run: "mask + SparseGPT's weight
  update", the ablation of the Wanda paper (Sun et al. 2023, section 5) that separates mask choice from update.
If a Cholesky factorisation fails the damping is multiplied by 10 (up to `max_damp_retries` times); the damping
actually used is returned in the per-linear stats.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sparsefast.config import SparseGPTConfig
from sparsefast.ops.int8_rows import INT8_MAX, int8_row_scales
from sparsefast.prune.base import Pruner, mask_stats


def damped_inverse_cholesky(h: torch.Tensor, percdamp: float, max_retries: int = 6) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = percdamp·mean(diag H), λ ×10 per failed factorisation.

    h: [in, in] symmetric PSD (float32/float64), modified in place (damping added). Returns (U, damping notes).
    """
    diag_mean = float(torch.diagonal(h).mean())
    idx = torch.arange(h.shape[0], device=h.device)
    damp_frac = percdamp
    added = 0.0
    for attempt in range(max_retries + 1):
        lam = damp_frac * diag_mean
        h[idx, idx] += lam - added
        added = lam
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(u).all():
                return u, {"percdamp": damp_frac, "damp": lam, "retries": attempt}
        damp_frac *= 10.0
    raise RuntimeError(f"sparsegpt: Cholesky failed even with damping {damp_frac / 10:g}·mean(diag H); the Hessian "
                       "is not usable (check the calibration data, or use --dtype float32)")


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float,
                           nm: tuple[int, int] | None = None, blocksize: int = 128,
                           percdamp: float = 0.01, mask: torch.Tensor | None = None,
                           int8_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Prune and update a weight with SparseGPT.

    weight: [out, in] any float dtype (not modified). hessian: [in, in] float32/float64 = 2XXᵀ/n (not modified).
    mask: optional bool [out, in] (True = pruned) used instead of SparseGPT's own selection (`sparsity` and `nm` are
    then ignored). int8_scales: optional [out] per-row scales: joint sparsification and quantization (SparseGPT
    section 3.5, GPTQ's rule): each kept weight is rounded to scale · clamp(round(w / scale), ±127) as its column is
    processed, so the OBS update of the remaining columns compensates the rounding error as well as the pruning.
    Computation runs in the hessian's dtype. Returns (new weight [out, in] in weight's dtype, damping notes).
    """
    rows, cols = weight.shape
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"sparsegpt: mask must be bool {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    cdtype = hessian.dtype
    w = weight.to(cdtype).clone()
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u, notes = damped_inverse_cholesky(h, percdamp)
    del h
    notes["dead_inputs"] = int(dead.sum())
    step = None if int8_scales is None else int8_scales.to(device=w.device, dtype=cdtype)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        count = b1 - b0
        w1 = w[:, b0:b1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        d1 = torch.diagonal(u1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool) if mask is None else mask[:, b0:b1].to(w1.device)
        if mask is None and nm is None:
            k = int(w1.numel() * sparsity)
            if k:
                score = (w1 * w1 / (d1 * d1)[None, :]).flatten()
                mask1.view(-1)[torch.sort(score, stable=True).indices[:k]] = True
        for i in range(count):
            col = w1[:, i]
            if mask is None and nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i:i + m] ** 2 / (d1[i:i + m] ** 2)[None, :]
                mask1.scatter_(1, i + torch.sort(score, dim=1, stable=True).indices[:, : m - n], True)
            q = col.masked_fill(mask1[:, i], 0.0)
            if step is not None:
                q = torch.round(q / step).clamp_(-INT8_MAX, INT8_MAX) * step
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, b0:b1] = q1
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return w.to(weight.dtype), notes


class SparseGPTPruner(Pruner):
    """Accumulates Σ x xᵀ per linear (hessian_dtype) and prunes each linear with sparsegpt_prune_weight."""

    needs_calibration = True

    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        self.dtype = torch.float64 if config.hessian_dtype == "float64" else torch.float32
        self.hessians: dict[str, torch.Tensor] = {}
        self.nseq: dict[str, int] = {}

    def start_layer(self, linears: Mapping[str, nn.Linear]) -> None:
        self.hessians = {name: torch.zeros(lin.in_features, lin.in_features, dtype=self.dtype,
                                           device=lin.weight.device) for name, lin in linears.items()}
        self.nseq = dict.fromkeys(linears, 0)

    def add_batch(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        if not torch.isfinite(x2).all():
            raise ValueError(f"sparsegpt: calibration activations entering {name} hold NaN or inf; check the "
                             "model's dtype (try --dtype float32) and the calibration data")
        self.hessians[name].addmm_(x2.T, x2)
        self.nseq[name] += x.shape[0] if x.dim() > 2 else 1

    def prune(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        if self.nseq.get(name, 0) == 0:
            raise RuntimeError(f"sparsegpt: no calibration activations reached {name}; the layer was never called")
        hessian = self.hessians.pop(name).to(linear.weight.device)
        hessian.mul_(2.0 / self.nseq[name])
        cfg = self.config
        # joint int8: the grid of each row is fixed from the dense row before the sweep (GPTQ's per-channel rule)
        scales = int8_row_scales(linear.weight.data) if cfg.quantize == "int8" else None
        new_w, notes = sparsegpt_prune_weight(linear.weight.data, hessian, sparsity=self.sparsity,
                                              nm=self.pattern.nm, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                              mask=self.fixed_mask(linear, hessian), int8_scales=scales)
        if self.refiner is not None:  # refine SparseGPT's mask on the original weights, then update for that mask
            chosen = new_w == 0
            refined = self.refine(name, linear.weight.data, chosen)
            if not torch.equal(refined, chosen):
                new_w, notes = sparsegpt_prune_weight(linear.weight.data, hessian, sparsity=self.sparsity,
                                                      blocksize=cfg.blocksize, percdamp=cfg.percdamp, mask=refined,
                                                      int8_scales=scales)
        del hessian
        if scales is not None:
            self.int8_scales[name] = scales  # new_w is on this grid: Pruner.quantize reads q off, no second rounding
        linear.weight.data.copy_(new_w)
        stats = mask_stats(linear.weight, self.sparsity)
        stats["damping"] = notes
        return stats

    def fixed_mask(self, linear: nn.Linear, hessian: torch.Tensor) -> torch.Tensor | None:
        """The mask to prune instead of SparseGPT's own choice (None: SparseGPT selects). A subclass returning e.g.
        Wanda's mask (from diag(hessian) ∝ ‖X_j‖²) gets "Wanda mask + SparseGPT update" (Wanda paper, section 5)."""
        return None

    def end_layer(self) -> None:
        self.hessians = {}
        self.nseq = {}
