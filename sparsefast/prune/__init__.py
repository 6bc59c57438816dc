"""Pruners behind one small interface (sparsefast.prune.base.Pruner): magnitude, Wanda, SparseGPT, RIA; the OWL
per-layer allocation (sparsefast.prune.owl) and the DSnoT mask refiner (sparsefast.prune.dsnot) apply to each.
The structural (LLM-Pruner style) pruner lives in sparsefast.prune.structural."""

from __future__ import annotations

from sparsefast.config import PruneConfig
from sparsefast.prune.base import (
    Pruner,
    apply_mask,
    mask_stats,
    max_nonzeros_per_group,
    round_linear_int8,
    score_mask,
)
from sparsefast.prune.dsnot import DSnoTRefiner, dsnot_refine
from sparsefast.prune.magnitude import MagnitudePruner, magnitude_mask
from sparsefast.prune.owl import outlier_ratio, owl_layer_sparsities
from sparsefast.prune.ria import RIAPruner, ria_mask, ria_score
from sparsefast.prune.sparsegpt import SparseGPTPruner, sparsegpt_prune_weight
from sparsefast.prune.wanda import WandaPruner

PRUNERS: dict[str, type[Pruner]] = {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner,
                                    "ria": RIAPruner}


def make_pruner(config: PruneConfig) -> Pruner:
    """The pruner for `config.method`, with the DSnoT refiner attached when config.refine asks for it."""
    if config.method not in PRUNERS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(PRUNERS)}")
    pruner = PRUNERS[config.method](config)
    if config.refine == "dsnot":
        pruner.refiner = DSnoTRefiner(config)
    return pruner


__all__ = ["PRUNERS", "DSnoTRefiner", "MagnitudePruner", "Pruner", "RIAPruner", "SparseGPTPruner", "WandaPruner",
           "apply_mask", "dsnot_refine", "magnitude_mask", "make_pruner", "mask_stats", "max_nonzeros_per_group",
           "outlier_ratio", "owl_layer_sparsities", "round_linear_int8", "ria_mask", "ria_score", "score_mask",
           "sparsegpt_prune_weight"]
