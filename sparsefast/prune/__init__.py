"""Pruners behind one small interface (sparsefast.prune.base.Pruner): magnitude, Wanda, SparseGPT.
The structural (LLM-Pruner style) pruner lives in sparsefast.prune.structural."""

from __future__ import annotations

from sparsefast.config import PruneConfig
from sparsefast.prune.base import Pruner, apply_mask, mask_stats, max_nonzeros_per_group
from sparsefast.prune.magnitude import MagnitudePruner, magnitude_mask
from sparsefast.prune.sparsegpt import SparseGPTPruner, sparsegpt_prune_weight
from sparsefast.prune.wanda import WandaPruner

PRUNERS: dict[str, type[Pruner]] = {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


def make_pruner(config: PruneConfig) -> Pruner:
    """The pruner for `config.method`."""
    if config.method not in PRUNERS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[config.method](config)


__all__ = ["PRUNERS", "MagnitudePruner", "Pruner", "SparseGPTPruner", "WandaPruner", "apply_mask", "magnitude_mask",
           "make_pruner", "mask_stats", "max_nonzeros_per_group", "sparsegpt_prune_weight"]
