"""Every configuration of sparsefast, in one place that imports no torch: the CLI parsers take their choices,
defaults and presets from here, so `sparsefast --help` stays light.

    prune.py       PruneConfig and one subclass per mask-pruning method (MagnitudeConfig, WandaConfig,
                   SparseGPTConfig, RIAConfig), sparsity patterns ("unstructured", "N:M"), the OWL allocation and
                   DSnoT refinement settings, make_config
    structural.py  StructuralConfig (LLM-Pruner structural pruning), its presets, choice tuples and layer ranges
    recover.py     RecoverConfig (LoRA recovery) and its defaults
    sparsify.py    SparsifyConfig (which sparse linears sparsefast.nn.sparsify_ swaps in) and SPARSE_MODES

Each config is a frozen dataclass validated once, in `__post_init__`, with a ValueError naming the field and the fix:
every instance that exists is valid, and the code that runs it trusts it.

    from sparsefast.config import WandaConfig
    config = WandaConfig(pattern="2:4", nsamples=128)
"""

from __future__ import annotations

from sparsefast.config.prune import (
    CONFIGS,
    METHODS,
    MagnitudeConfig,
    Pattern,
    PruneConfig,
    RIAConfig,
    SparseGPTConfig,
    WandaConfig,
    make_config,
    parse_pattern,
)
from sparsefast.config.recover import RecoverConfig
from sparsefast.config.sparsify import SPARSE_MODES, SparsifyConfig
from sparsefast.config.structural import StructuralConfig

__all__ = ["CONFIGS", "METHODS", "SPARSE_MODES", "MagnitudeConfig", "Pattern", "PruneConfig", "RIAConfig",
           "RecoverConfig", "SparseGPTConfig", "SparsifyConfig", "StructuralConfig", "WandaConfig", "make_config",
           "parse_pattern"]
