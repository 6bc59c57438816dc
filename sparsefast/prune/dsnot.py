"""DSnoT mask refinement (Zhang, Zhao, Lin, Zhang, Zhao, Huang, Cai, Ji 2024, "Dynamic Sparse No Training:
Training-Free Fine-tuning for Sparse LLMs", ICLR 2024).

Given a linear's dense weight W [out, in], a mask from any method and the layer's calibration statistics per input
channel j (m_j = Σ_tokens x_j / number of calibration sequences, the per-token variance Var(x_j), ‖X_j‖₂), each
output row i is refined by swaps that keep its number of pruned weights:

    c_ij = W_ij · m_j                        expected contribution of weight ij to output i, over a sequence
    ε_i  = Σ_{j pruned} c_ij                 expected reconstruction error of row i (dense − sparse output)
    grow   g = argmax over initially pruned, still pruned j with sign(c_ij) = sign(ε_i) of |c_ij| / Var(x_j)^γ
    prune  p = argmin over initially kept, still kept j of |W_ij| · ‖X_j‖₂ (Wanda's importance), where
               unstructured: sign(c_ij) = −sign(ε_i);  N:M: j in the M-group of g (so every group keeps N)
    ε_i ← ε_i − c_ig + c_ip

A row swaps while |ε_i| > threshold, at most `cycles` times; it stops for good when a candidate is missing or (N:M,
as in the paper's N:M setting) when the swap would flip the sign of ε_i. Each weight moves at most once (a regrown
weight is never pruned again, a weight pruned by a swap never regrown), so a row cannot oscillate, and the candidate
lists can be sorted once and consumed in order (the reference code's pointers). Ties go to the
lower column index. Defaults are the paper's (its code's): γ = 1, 50 cycles, threshold 0.1 on ε in the units above
(per sequence, as the reference code accumulates E[x]; a per-token mean would make the threshold seqlen times
looser), and only the attention projections refined (dsnot_scope "attention"; "all" refines the MLP's too).

Where this reading differs from the reference code: (1) a row stops when its best growth candidate has no pruning
partner (the code would then take a wrong-sign or an already moved weight); (2) the N:M pruning candidate is the
least Wanda-important kept weight of the group for every method (the code uses the initial method's score);
(3) with SparseGPT the refined mask gets SparseGPT's weight update again (sparsefast.prune.sparsegpt: the pass runs
twice per linear), where the code uses SparseGPT's score for the initial mask only and updates nothing. No weight
update for the other methods: the kept weights keep their dense values.
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
    """The refined mask [out, in] (True = pruned; `pruned` is not modified). mean: m_j (the module docstring's
    units), var: Var(x_j), sq_norm: Σ_tokens x_j², each [in]. Computed in fp32 on the weight's device, ε in fp64.

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
            least = torch.where(ok, importance.gather(1, group), torch.inf).argmin(dim=1, keepdim=True)
            p = group.gather(1, least)[:, 0]
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
    """Collects Σx and Σx² per input channel (fp64) and the token and sequence counts of the linears it refines in
    the current layer, and refines the masks the pruner hands to `refine` with dsnot_refine. The engine drives it
    like a pruner (start_layer, add_batch, end_layer) and sets `targets`, the layer's linears in scope."""

    def __init__(self, config: PruneConfig) -> None:
        self.cycles = config.dsnot_cycles
        self.threshold = config.dsnot_threshold
        self.var_power = config.dsnot_var_power
        self.scope = config.dsnot_scope
        self.targets: tuple[str, ...] = ()
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts: dict[str, list[int]] = {}  # [tokens, sequences]
        self.swapped: dict[str, int] = {}

    def start_layer(self, linears: Mapping[str, nn.Linear]) -> None:
        self.sums = {name: (torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device),
                            torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device))
                     for name, lin in linears.items() if name in self.targets}
        self.counts = {name: [0, 0] for name in self.sums}

    def add_batch(self, name: str, x: torch.Tensor) -> None:
        if name not in self.sums:
            return
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1])
        s1, s2 = self.sums[name]
        s1 += flat.sum(dim=0, dtype=torch.float64)
        s2 += (flat.float() * flat.float()).sum(dim=0, dtype=torch.float64)
        self.counts[name][0] += flat.shape[0]
        self.counts[name][1] += x.shape[0] if x.dim() > 2 else 1

    def refine(self, name: str, weight: torch.Tensor, pruned: torch.Tensor, *,
               nm: tuple[int, int] | None) -> torch.Tensor:
        if name not in self.targets:
            self.swapped[name] = 0
            return pruned
        tokens, sequences = self.counts.get(name, (0, 0))
        if tokens == 0:
            raise RuntimeError(f"dsnot: no calibration activations reached {name}; the layer was never called")
        s1, s2 = self.sums[name]
        mean = s1 / tokens
        var = (s2 / tokens - mean * mean).clamp_min(0.0)
        refined = dsnot_refine(weight, pruned, (s1 / sequences).float(), var.float(), s2.float(), nm=nm,
                               cycles=self.cycles, threshold=self.threshold, var_power=self.var_power)
        self.swapped[name] = int((refined & ~pruned).sum())
        return refined

    def permute(self, name: str, order: torch.Tensor) -> None:
        """The input channels of `name` were reordered (new k = old order[k]): reorder its statistics too (a linear
        outside the refiner's scope, e.g. RIA's down projections with the attention scope, has none)."""
        if name in self.sums:
            self.sums[name] = tuple(t[order.to(t.device)] for t in self.sums[name])

    def end_layer(self) -> None:
        self.sums = {}
        self.counts = {}
