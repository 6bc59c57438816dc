"""Wanda pruning (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Statistic: s_j = Σ_tokens x_j² per input channel of every linear (sparsefast.ops.sq_norm_accumulate, fp32),
collected over all calibration tokens of the layer's inputs. Score |W_ij|·√s_j, compared within each output row
(unstructured: exactly int(in·sparsity) pruned per row) or within each M-group (N:M); the ranking, its tie rule and
the counts are those of sparsefast.ops.wanda_mask. No weight update.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sparsefast.config import WandaConfig
from sparsefast.ops.sq_norm import sq_norm_accumulate
from sparsefast.ops.wanda_mask import wanda_mask
from sparsefast.prune.base import Pruner, apply_mask, mask_stats


class WandaPruner(Pruner):
    """Accumulates Σx² per input channel and prunes with wanda_mask (RIAPruner: the same statistic, its score)."""

    needs_calibration = True

    def __init__(self, config: WandaConfig) -> None:
        super().__init__(config)
        self.acc: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def start_layer(self, linears: Mapping[str, nn.Linear]) -> None:
        self.acc = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
                    for name, lin in linears.items()}
        self.tokens = dict.fromkeys(linears, 0)

    def add_batch(self, name: str, x: torch.Tensor) -> None:
        sq_norm_accumulate(self.acc[name], x.detach(), backend=self.config.backend)
        self.tokens[name] += x.numel() // x.shape[-1]

    def mask(self, weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
        """Bool mask (True = pruned) of `weight` from Σx² per input channel: Wanda's (subclasses: their score's)."""
        return wanda_mask(weight, act_sq_norm, backend=self.config.backend, **self.mask_kwargs())

    def check_calibrated(self, name: str) -> None:
        """RuntimeError when no calibration activation reached linear `name`."""
        if self.tokens.get(name, 0) == 0:
            raise RuntimeError(f"{self.config.method}: no calibration activations reached {name}; the layer was "
                               "never called")

    def prune(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        self.check_calibrated(name)
        mask = self.mask(linear.weight, self.acc[name].to(linear.weight.device))
        apply_mask(linear, self.refine(name, linear.weight, mask))
        stats = mask_stats(linear.weight, self.sparsity)
        stats["tokens"] = self.tokens[name]
        return stats

    def end_layer(self) -> None:
        self.acc = {}
        self.tokens = {}
