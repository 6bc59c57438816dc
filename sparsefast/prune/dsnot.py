"""DSnoT mask refinement (Zhang, Zhao, Lin, Zhang, Zhao, Huang, Cai, Ji 2024, "Dynamic Sparse No Training:
Training-Free Fine-tuning for Sparse LLMs", ICLR 2024).

Given a linear's dense weight W [out, in], a mask from any method and the layer's calibration statistics per input
channel j (mean E[x_j], variance Var(x_j), ‖X_j‖₂), each output row i is refined by swaps that keep its number of
pruned weights:

    c_ij = W_ij · E[x_j]                     expected contribution of weight ij to output i
    ε_i  = Σ_{j pruned} c_ij                 expected reconstruction error of row i (dense − sparse output)
    grow   g = argmax over initially pruned, still pruned j with sign(c_ij) = sign(ε_i) of |c_ij| / Var(x_j)^γ
    prune  p = argmin over initially kept, still kept j of |W_ij| · ‖X_j‖₂ (Wanda's importance), where
               unstructured: sign(c_ij) = −sign(ε_i);  N:M: j in the M-group of g (so every group keeps N)
    ε_i ← ε_i − c_ig + c_ip

A row swaps while |ε_i| > threshold, at most `cycles` times; it stops for good when a candidate is missing or (N:M,
as in the paper's N:M setting) when the swap would flip the sign of ε_i. Each weight moves at most once (a regrown
weight is never pruned again, a weight pruned by a swap never regrown), so a row cannot oscillate, and the candidate
lists can be sorted once and consumed in order (the reference code's pointers). Ties go to the
lower column index. Defaults are the paper's: γ = 1, 50 cycles, threshold 0.1. No weight update: the kept weights
keep their dense values (with SparseGPT, sparsefast.prune.sparsegpt re-runs its update for the refined mask).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from sparsefast.config import PruneConfig


@torch.no_grad()
def dsnot_refine(weight: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sq_norm: torch.Tensor, *, nm: tuple[int, int] | None = None, cycles: int = 50,
                 threshold: float = 0.1, var_power: float = 1.0) -> torch.Tensor:
    """The refined mask [out, in] (True = pruned; `pruned` is not modified). mean, var: E[x_j], Var(x_j) [in];
    sq_norm: Σ_tokens x_j² [in]. Computed in fp32 on the weight's device, the errors ε in fp64.

    Since every weight moves at most once, each candidate list (growth by sign of c, pruning by sign of c) is sorted
    once per row and consumed from its head: a cycle costs O(rows), not O(rows × in)."""
    rows, cols = weight.shape
    if pruned.shape != weight.shape or pruned.dtype != torch.bool:
        raise ValueError(f"dsnot: mask must be bool {tuple(weight.shape)}, got {pruned.dtype} {tuple(pruned.shape)}")
    if not (mean.shape == var.shape == sq_norm.shape == (cols,)):
        raise ValueError(f"dsnot: mean, var and sq_norm must be [in]={cols}")
    w = weight.float()
    dev = w.device
    c = w * mean.to(dev, torch.float32)[None, :]
    importance = w.abs() * sq_norm.to(dev, torch.float32).sqrt()[None, :]
    grow_key = c.abs() / var.to(dev, torch.float32).pow(var_power)[None, :]
    init = pruned.to(dev)
    mask = init.clone()
    eps = torch.where(init, c, 0.0).sum(dim=1, dtype=torch.float64)

    def ranked(eligible: torch.Tensor, key: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the eligible columns first, by key (ties: lower column first), and how many are eligible."""
        fill = -torch.inf if descending else torch.inf
        order = torch.sort(torch.where(eligible, key, fill), dim=1, descending=descending, stable=True).indices
        return order, eligible.count_nonzero(dim=1)

    # index 0: for rows with ε > 0, index 1: ε < 0
    grow = [ranked(init & (c > 0), grow_key, True), ranked(init & (c < 0), grow_key, True)]
    if nm is None:
        cut = [ranked(~init & (c < 0), importance, False), ranked(~init & (c > 0), importance, False)]
    ptr = torch.zeros(4, rows, dtype=torch.long, device=dev)  # grow +, grow -, prune +, prune -
    arange = torch.arange(rows, device=dev)
    active = eps.abs() > threshold
    for _ in range(cycles):
        if not bool(active.any()):
            break
        neg = eps < 0
        which = neg.long()

        def take(lists: list, k0: int) -> tuple[torch.Tensor, torch.Tensor]:
            at = torch.where(neg, ptr[k0 + 1], ptr[k0])
            count = torch.where(neg, lists[1][1], lists[0][1])
            pos = at.clamp(max=cols - 1)[:, None]
            col = torch.where(neg, lists[1][0].gather(1, pos)[:, 0], lists[0][0].gather(1, pos)[:, 0])
            return col, at < count

        g, has = take(grow, 0)
        if nm is None:
            p, has_p = take(cut, 2)
        else:
            m = nm[1]
            group = (g // m * m)[:, None] + torch.arange(m, device=dev)[None, :]
            ok = ~init.gather(1, group) & ~mask.gather(1, group)
            p = group.gather(1, torch.where(ok, importance.gather(1, group), torch.inf).argmin(dim=1, keepdim=True))[:, 0]
            has_p = ok.any(dim=1)
        after = eps - c[arange, g].double() + c[arange, p].double()
        swap = active & has & has_p
        if nm is not None:
            swap &= torch.sign(after) == torch.sign(eps)
        mask[arange[swap], g[swap]] = False
        mask[arange[swap], p[swap]] = True
        ptr[which, arange] += swap
        if nm is None:
            ptr[2 + which, arange] += swap
        eps = torch.where(swap, after, eps)
        active = swap & (eps.abs() > threshold)
    return mask.to(pruned.device)


class DSnoTRefiner:
    """Collects E[x], Var(x) and Σx² per input channel of every linear of the current layer (fp64 sums) and refines
    the masks the pruner hands to `refine` with dsnot_refine. The engine drives it like a pruner (start_layer,
    add_batch, end_layer)."""

    def __init__(self, config: PruneConfig) -> None:
        self.cycles = config.dsnot_cycles
        self.threshold = config.dsnot_threshold
        self.var_power = config.dsnot_var_power
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self.swapped: dict[str, int] = {}

    def start_layer(self, linears: Mapping[str, nn.Linear]) -> None:
        self.sums = {name: (torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device),
                            torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device))
                     for name, lin in linears.items()}
        self.tokens = dict.fromkeys(linears, 0)

    def add_batch(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        s1, s2 = self.sums[name]
        s1 += x2.sum(dim=0)
        s2 += (x2 * x2).sum(dim=0)
        self.tokens[name] += x2.shape[0]

    def refine(self, name: str, weight: torch.Tensor, pruned: torch.Tensor, *,
               nm: tuple[int, int] | None) -> torch.Tensor:
        n = self.tokens.get(name, 0)
        if n == 0:
            raise RuntimeError(f"dsnot: no calibration activations reached {name}; the layer was never called")
        s1, s2 = self.sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        refined = dsnot_refine(weight, pruned, mean.float(), var.float(), s2.float(), nm=nm, cycles=self.cycles,
                               threshold=self.threshold, var_power=self.var_power)
        self.swapped[name] = int((refined & ~pruned).sum())
        return refined

    def permute(self, name: str, order: torch.Tensor) -> None:
        """The input channels of `name` were reordered (new k = old order[k]): reorder its statistics too."""
        self.sums[name] = tuple(t[order.to(t.device)] for t in self.sums[name])

    def end_layer(self) -> None:
        self.sums = {}
        self.tokens = {}
