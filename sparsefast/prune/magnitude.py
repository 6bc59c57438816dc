"""Magnitude pruning: remove the weights of smallest |W| (the baseline of Han et al. 2015; Wanda's Table 2 row).

Ranking key and tie rule are those of sparsefast.ops.wanda_mask with all activation norms equal to one:
key = fl32(W²) (same order as |W|), ties broken by the lower index pruned first.
- scope "row": per output row exactly int(in·sparsity) pruned (wanda_mask with ones).
- scope "layer": one threshold per linear, exactly int(numel·sparsity) pruned, ordered by (key, flat row-major index).
- N:M: within every M-group of a row, the M − N smallest pruned (wanda_mask with ones), whatever the scope.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsefast.config import MagnitudeConfig
from sparsefast.ops.wanda_mask import wanda_key, wanda_mask
from sparsefast.prune.base import Pruner, apply_mask, mask_stats, score_mask


@torch.no_grad()
def magnitude_layer_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask [out, in], True = pruned: the int(numel·sparsity) weights with the smallest (W², flat index)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    ones = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    return score_mask(wanda_key(weight, ones), sparsity=sparsity, scope="layer")


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, *, sparsity: float | None = None, n: int | None = None,
                   m: int | None = None, scope: str = "layer", backend: str | None = "auto") -> torch.Tensor:
    """Magnitude prune mask [out, in] (True = pruned) for unstructured (`sparsity`, `scope`) or N:M (`n`, `m`)."""
    if n is None and scope == "layer":
        return magnitude_layer_mask(weight, sparsity)
    ones = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    return wanda_mask(weight, ones, sparsity=sparsity, n=n, m=m, backend=backend)


class MagnitudePruner(Pruner):
    """Needs no calibration: the engine calls only `prune` for every linear."""

    needs_calibration = False

    def __init__(self, config: MagnitudeConfig) -> None:
        super().__init__(config)
        self.scope = config.scope

    def prune(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        mask = magnitude_mask(linear.weight, scope=self.scope, backend=self.config.backend, **self.mask_kwargs())
        apply_mask(linear, self.refine(name, linear.weight, mask))
        return mask_stats(linear.weight, self.sparsity)
