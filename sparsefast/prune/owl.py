"""OWL layer-wise sparsity (Yin, Wu, Zhang, Fang, Zhang, Li, Sun, Jaiswal, Chen, Pechenizkiy, Wang, Liu 2024,
"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

Layers with more outliers keep more weights. For decoder layer l, over the Wanda scores A = |W_ij|·‖X_j‖₂ of all its
prunable linears together (activations of the dense model, layer by layer: sparsefast.calibrate.layer_outlier_ratios):

    D_l = #{A > M · mean(A)} / #A                                  outlier ratio, M = owl_m (paper: 5 for LLaMA)
    r_l = 2λ · (D_l − min D) / (max D − min D)                     λ = owl_lambda (paper: 0.08)
    density_l = r_l − mean(r) + (1 − S),  sparsity_l = 1 − density_l

so the per-layer sparsities lie within S ± 2λ, span at most 2λ, and their mean is the target S (every decoder layer
holds the same number of prunable weights, so that is also the overall sparsity up to each row's rounding down).
Equal outlier ratios give the uniform allocation. The chosen sparsity then applies to every prunable linear of the
layer, with any mask method.
"""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """D = fraction of the entries of all `scores` (one tensor per linear) above m × their common mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_layer_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsities from the layers' outlier ratios (module docstring); mean == target."""
    ratios = [float(r) for r in ratios]
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [float(target)] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    shift = sum(scaled) / len(scaled)
    sparsities = [1.0 - (r - shift + (1.0 - target)) for r in scaled]
    bad = [(i, s) for i, s in enumerate(sparsities) if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"owl: layer {bad[0][0]} would get sparsity {bad[0][1]:.4f}, outside [0, 1); lower "
                         f"owl_lambda (now {lam:g})")
    return sparsities
