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

Not included: the paper's channel permutation before N:M (its "channel reallocation" and linear-sum-assignment
refinement). A permutation of a linear's input channels is free at run time only when it can be folded into the
weights that produce those channels; here that holds for down_proj (fold into gate/up rows) but not for the
linears that read the residual stream (q/k/v, gate/up) or o_proj (whose inputs are grouped by attention head).
"""

from __future__ import annotations

import torch

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


class RIAPruner(WandaPruner):
    """Wanda's statistic (Σx² per input channel), RIA's score: ria_mask."""

    def mask(self, weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
        return ria_mask(weight, act_sq_norm, alpha=self.config.alpha, scope=self.config.scope, **self.mask_kwargs())
