"""The small interface every pruner implements, driven by sparsefast.calibrate.

Per decoder layer the engine calls `start_layer(linears)`, then `add_batch(name, x)` from forward hooks for every
calibration batch (x is the linear's input, [..., in_features]), then `prune(name, linear)` once per linear (which
zeroes weights in place and returns per-linear stats), then `end_layer()` to free the statistics.

A pruner may carry a `refiner` (sparsefast.prune.dsnot.DSnoTRefiner): the engine feeds it the same calls
(start_layer / add_batch / end_layer), and the pruner passes its mask through `refine` before zeroing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sparsefast.config import PruneConfig
from sparsefast.ops.int8_rows import SCALE_BUFFER, dequantize_int8_rows, quantize_int8_rows


class Pruner:
    """Base pruner. Subclasses set `needs_calibration` and implement `prune` (and `add_batch` if they need data)."""

    needs_calibration: bool = True

    def __init__(self, config: PruneConfig) -> None:
        self.config = config  # valid by construction (frozen, checked in __post_init__)
        self.pattern = config.parsed_pattern
        self.sparsity = config.target_sparsity  # the engine sets a layer's own value under OWL allocation
        self.refiner: Any = None  # a mask refiner (sparsefast.prune.dsnot.DSnoTRefiner) or None
        # {linear name: linears producing its input channels} of the current layer, set by the engine
        # (sparsefast.models.base.ModelAdapter.channel_producers): where an input permutation may be folded
        self.channel_producers: dict[str, list[nn.Linear]] = {}
        # {linear name: int8 scales [out]} a pruner fixed while pruning (SparseGPT's joint sweep); `quantize` uses them
        self.int8_scales: dict[str, torch.Tensor] = {}

    def refine(self, name: str, weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        """The mask `pruned` [out, in] (True = pruned) of `weight` (still dense) after the refiner, if any."""
        if self.refiner is None:
            return pruned
        return self.refiner.refine(name, weight, pruned, nm=self.pattern.nm)

    def start_layer(self, linears: Mapping[str, nn.Linear]) -> None:
        """Allocate per-linear statistics for one decoder layer (on the linears' device)."""

    def add_batch(self, name: str, x: torch.Tensor) -> None:
        """Accumulate statistics of the input x [..., in_features] of linear `name`."""
        raise NotImplementedError(f"{type(self).__name__} does not use calibration data")

    def prune(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        """Zero weights of `linear` in place; return stats (at least those of mask_stats)."""
        raise NotImplementedError

    def end_layer(self) -> None:
        """Free the statistics of the current layer."""

    def quantize(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        """After `prune`, with config.quantize == "int8": the pruned weight rounded to its per-row int8 grid
        (sparsefast.ops.int8_rows; zeros stay zeros), the dequantized values kept in the weight and the scales as the
        linear's `weight_scale` buffer. Returns stats. A pruner that quantized while pruning (SparseGPT's joint
        sweep) left its grid in `int8_scales`: the weight is already on it, so this only reads q off."""
        return round_linear_int8(linear, self.int8_scales.pop(name, None))

    def mask_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for sparsefast.ops.wanda_mask: sparsity=... or n=, m=."""
        if self.pattern.nm is None:
            return {"sparsity": self.sparsity}
        n, m = self.pattern.nm
        return {"n": n, "m": m}


@torch.no_grad()
def apply_mask(linear: nn.Linear, pruned: torch.Tensor) -> None:
    """Zero the weights of `linear` where `pruned` [out, in] (bool) is True."""
    if pruned.shape != linear.weight.shape or pruned.dtype != torch.bool:
        raise ValueError(f"mask must be bool {tuple(linear.weight.shape)}, got {pruned.dtype} {tuple(pruned.shape)}")
    linear.weight.masked_fill_(pruned.to(linear.weight.device), 0)


@torch.no_grad()
def score_mask(score: torch.Tensor, *, sparsity: float | None = None, n: int | None = None, m: int | None = None,
               scope: str = "row") -> torch.Tensor:
    """Bool mask [out, in] (True = pruned) of the lowest entries of `score` [out, in], ties to the lower index:
    scope "row": exactly int(in·sparsity) per row; "layer": exactly int(numel·sparsity) over the whole matrix (flat
    row-major order); N:M (`n`, `m`, any scope): the M − N lowest of every group of M consecutive columns."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if n is not None:
        idx = torch.sort(score.reshape(rows, cols // m, m), dim=2, stable=True).indices[:, :, : m - n]
        mask.view(rows, cols // m, m).scatter_(2, idx, True)
    elif scope == "layer":
        k = int(score.numel() * sparsity)
        if k:
            mask.view(-1)[torch.sort(score.flatten(), stable=True).indices[:k]] = True
    else:
        k = int(cols * sparsity)
        if k:
            mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


@torch.no_grad()
def mask_stats(weight: torch.Tensor, requested: float) -> dict[str, Any]:
    """Achieved sparsity of a pruned weight [out, in]: zeros / numel, plus the min/max zeros per row."""
    zeros_per_row = (weight == 0).sum(dim=1)
    zeros = int(zeros_per_row.sum())
    return {"shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
            "requested_sparsity": requested, "achieved_sparsity": zeros / max(weight.numel(), 1),
            "min_row_zeros": int(zeros_per_row.min()) if weight.shape[0] else 0,
            "max_row_zeros": int(zeros_per_row.max()) if weight.shape[0] else 0}


@torch.no_grad()
def max_nonzeros_per_group(weight: torch.Tensor, m: int) -> int:
    """Largest number of nonzeros in any group of m consecutive input columns of any row (N:M check)."""
    rows, cols = weight.shape
    return int((weight != 0).reshape(rows, cols // m, m).sum(dim=2).max()) if weight.numel() else 0


@torch.no_grad()
def attach_int8(linear: nn.Linear, q: torch.Tensor, scales: torch.Tensor, *, rounded: bool) -> dict[str, Any]:
    """Store int8 `q` [out, in] with `scales` [out] in `linear`: weight = scales · q (in the weight's dtype) and a
    float32 `weight_scale` buffer. Returns stats: the relative Frobenius change of the weight when `rounded` here."""
    new = dequantize_int8_rows(q.to(linear.weight.device), scales.to(linear.weight.device), linear.weight.dtype)
    stats: dict[str, Any] = {"format": "int8-rows", "max_abs_q": int(q.abs().max()) if q.numel() else 0}
    if rounded:
        old = linear.weight.data.float()
        stats["relative_change"] = float((new.float() - old).norm() / old.norm().clamp_min(1e-30))
    linear.weight.data.copy_(new)
    linear.register_buffer(SCALE_BUFFER, scales.to(device=linear.weight.device, dtype=torch.float32))
    return stats


@torch.no_grad()
def round_linear_int8(linear: nn.Linear, scales: torch.Tensor | None = None) -> dict[str, Any]:
    """`linear`'s weight to the per-row int8 grid (`scales`, default its absmax grid; a weight already on the given
    grid is only read off) with its `weight_scale` buffer attached: every pruned linear's `Pruner.quantize`, and the
    LM head's, which is never pruned (a tied token embedding, the same tensor, with it). Returns stats."""
    q, scales_used = quantize_int8_rows(linear.weight.data, scales)
    return attach_int8(linear, q, scales_used, rounded=scales is None)
