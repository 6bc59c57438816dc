"""StructuralConfig: the settings of LLM-Pruner-style structural pruning (Ma et al., 2023, arXiv:2305.11627).

Every field is checked by `validate()` before any work; bad values raise ValueError naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMPORTANCES = ("random", "l2", "vector", "element1", "element2", "mix")
AGGREGATIONS = ("sum", "prod", "max", "last", "mean")
STRATEGIES = ("block", "channel", "layer")
RANKINGS = ("local", "global")
GQA_MODES = ("divisible", "kv_groups")


def parse_layer_range(spec: str | tuple[int, int] | None, num_layers: int) -> tuple[int, int]:
    """'3-27' (inclusive, like LLM-Pruner's --block_*_layer_start/end) → (3, 28) half-open.

    None → LLM-Pruner's habit of leaving the first and the last decoder layer dense: (1, num_layers - 1).
    Raises ValueError when the range is malformed, empty or outside [0, num_layers).
    """
    if spec is None:
        start, stop = 1, num_layers - 1
    elif isinstance(spec, tuple):
        start, stop = spec
    else:
        parts = str(spec).split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"layers {spec!r} is not of the form START-END (inclusive, e.g. 3-27)")
        start, stop = int(parts[0]), int(parts[1]) + 1
    if not (0 <= start < stop <= num_layers):
        raise ValueError(f"layer range {start}-{stop - 1} is outside the model's {num_layers} decoder layers "
                         f"(valid: 0-{num_layers - 1}); pass --layers START-END inside it")
    return start, stop


@dataclass
class StructuralConfig:
    """What to remove and how to rank it.

    ratio: fraction of the prunable units removed (heads + MLP channels for `block`, hidden channels for `channel`,
        decoder layers inside `layers` for `layer`); in [0, 1).
    importance: random | l2 (weight magnitude) | vector (|Σ W·g| per unit, LLM-Pruner "vectorize") |
        element1 (Σ|W·g|, first-order Taylor per parameter) | element2 (Σ|W²·F|, F = diagonal Fisher from per-sample
        squared gradients) | mix (Σ|W·g − ½W²·F|, LLM-Pruner "param_mix").
    aggregation: how a group's member scores (one per coupled weight slice) are combined: sum | prod | max | mean |
        last (the member executed last, e.g. down_proj columns; the paper's "last" that LLM-Pruner's code lacks).
    strategy: block (heads + MLP channels per layer) | channel (hidden dimension) | layer (whole decoder layers).
    layers: 'START-END' inclusive, or None for every layer except the first and the last (block, layer; channel
        pruning spans every layer).
    ranking: local (same ratio in every layer) | global (one ranking across the layer range).
    gqa: divisible (drop the same number of query heads from every KV group, KV heads kept) |
        kv_groups (drop whole KV groups with their query heads).
    allow_empty_layers: permit global ranking to remove every unit of a kind in a layer (otherwise ≥1 is kept).
    """

    ratio: float = 0.2
    importance: str = "element1"
    aggregation: str = "sum"
    strategy: str = "block"
    layers: str | None = None
    ranking: str = "local"
    gqa: str = "divisible"
    prune_attention: bool = True
    prune_mlp: bool = True
    nsamples: int = 10
    seqlen: int = 128
    seed: int = 0
    gradient_checkpointing: bool = True
    allow_empty_layers: bool = False

    def validate(self) -> None:
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}; e.g. --ratio 0.2 removes 20%")
        for name, value, allowed in (("importance", self.importance, IMPORTANCES),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("ranking", self.ranking, RANKINGS), ("gqa", self.gqa, GQA_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"nsamples must be ≥ 1 and seqlen ≥ 2; got {self.nsamples}, {self.seqlen}")
        if self.strategy == "block" and not (self.prune_attention or self.prune_mlp):
            raise ValueError("block strategy with prune_attention=False and prune_mlp=False removes nothing")

    @property
    def needs_gradients(self) -> bool:
        return self.importance in ("vector", "element1", "element2", "mix")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
