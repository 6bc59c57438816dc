"""RIA pruning (Zhang, Zhao, Lin, Cai, Wu, Chen, Liang, Ke, Soltanolkotabi, Chen, Xu 2024, "Plug-and-Play: An
Efficient Post-training Pruning Method for Large Language Models", ICLR 2024).

Relative importance of weight W_ij (i output row, j input column) among the weights of its row and of its column,
times the activation term:

    RIA_ij = ( |W_ij| / Σ_k |W_ik|  +  |W_ij| / Σ_k |W_kj| ) · (‖X_j‖₂)^a,    a = 0.5 by default,

with ‖X_j‖₂² = Σ_tokens x_j² from the same statistic Wanda collects (sparsefast.ops.sq_norm_accumulate). The lowest
scores are pruned (sparsefast.prune.base.score_mask, ties to the lower index): per linear with one threshold (the
paper's unstructured setting, scope "layer"), per output row (scope "row", Wanda's comparison group) or within each
M-group (N:M). A row or column whose weights are all zero contributes a zero term (its weights score 0 there).
No weight update.

Channel reallocation before N:M (the paper's heuristic, `reallocation=True`): input channels are ordered by their
column sum of RIA scores and dealt round the M positions of the groups in a zig-zag (the lowest quarter to position
0, the next quarter to position 1 in reverse, ...), so every group holds channels of every importance class and fewer
important weights fall to the N:M rule. A permutation of input channels is free at run time only where it folds into
the weights that produce those channels, so it is applied to the MLP's down projection, with the rows of gate/up (or
fc1) permuted the same way (sparsefast.models.base.ModelAdapter.channel_producers); the model computes the same
function, and the saved checkpoint and the sparse kernels see a plain N:M weight. It is kept only when it raises the
total RIA score of the kept weights. Not included: the paper's optional linear-sum-assignment refinement.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsefast.prune.base import score_mask
from sparsefast.prune.wanda import WandaPruner


@torch.no_grad()
def ria_score(weight: torch.Tensor, act_sq_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA score [out, in] in fp32 of weight [out, in] and act_sq_norm [in] (Σ_tokens x_j², fp32)."""
    if weight.dim() != 2 or act_sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"ria_score: weight [out, in] and act_sq_norm [in] expected, got {tuple(weight.shape)} "
                         f"and {tuple(act_sq_norm.shape)}")
    a = weight.float().abs()
    row_sum = a.sum(dim=1, keepdim=True)
    col_sum = a.sum(dim=0, keepdim=True)
    relative = torch.where(row_sum > 0, a / row_sum, 0.0) + torch.where(col_sum > 0, a / col_sum, 0.0)
    return relative * act_sq_norm.float().sqrt().pow(alpha)[None, :]


@torch.no_grad()
def ria_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, alpha: float = 0.5, sparsity: float | None = None,
             n: int | None = None, m: int | None = None, scope: str = "layer") -> torch.Tensor:
    """Bool mask [out, in] (True = pruned) of the lowest RIA scores (see the module docstring for the groups)."""
    return score_mask(ria_score(weight, act_sq_norm, alpha), sparsity=sparsity, n=n, m=m, scope=scope)


def reallocation_order(score: torch.Tensor, m: int) -> torch.Tensor:
    """The channel order [in] (new column k reads old column order[k]) of the heuristic channel reallocation: the
    channels sorted by the column sums of `score` [out, in], the q-th 1/m of that list dealt to position q of every
    M-group, reversed for odd q."""
    cols = score.shape[1]
    ranked = torch.sort(score.sum(dim=0), stable=True).indices
    order = torch.empty_like(ranked)
    per = cols // m
    for q in range(m):
        part = ranked[q * per:(q + 1) * per]
        order[q::m] = part.flip(0) if q % 2 else part
    return order


@torch.no_grad()
def permute_input_channels(linear: nn.Linear, producers: list[nn.Linear], order: torch.Tensor) -> None:
    """Reorder the input channels of `linear` and, identically, the output rows (and biases) of `producers`."""
    linear.weight.data = linear.weight.data[:, order.to(linear.weight.device)].contiguous()
    for lin in producers:
        lin.weight.data = lin.weight.data[order.to(lin.weight.device)].contiguous()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[order.to(lin.bias.device)].contiguous()


class RIAPruner(WandaPruner):
    """Wanda's statistic (Σx² per input channel), RIA's score: ria_mask; with N:M and config.reallocation, the
    channel reallocation of the linears listed in `channel_producers` (set by the engine per layer)."""

    def mask(self, weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
        return ria_mask(weight, act_sq_norm, alpha=self.config.alpha, scope=self.config.scope, **self.mask_kwargs())

    def prune(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        note = None
        if self.config.reallocation and self.pattern.nm is not None and name in self.channel_producers:
            self.check_calibrated(name)
            note = self.reallocate(name, linear)
        stats = super().prune(name, linear)
        if note is not None:
            stats["reallocation"] = note
        return stats

    def reallocate(self, name: str, linear: nn.Linear) -> dict[str, Any]:
        """Apply the channel reallocation to `linear` and its producers if it keeps more RIA score under N:M."""
        act = self.acc[name].to(linear.weight.device)
        score = ria_score(linear.weight, act, self.config.alpha)
        n, m = self.pattern.nm
        order = reallocation_order(score, m)
        before = float(score[~score_mask(score, n=n, m=m)].sum())
        moved = score[:, order]
        after = float(moved[~score_mask(moved, n=n, m=m)].sum())
        if after > before:
            permute_input_channels(linear, self.channel_producers[name], order)
            self.acc[name] = self.acc[name][order.to(self.acc[name].device)]
            if self.refiner is not None:
                self.refiner.permute(name, order)
        return {"kept_score_before": before, "kept_score_after": after, "applied": after > before,
                "order": order.tolist() if after > before else None}
