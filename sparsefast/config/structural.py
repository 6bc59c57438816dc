"""StructuralConfig: the settings of LLM-Pruner-style structural pruning (Ma et al., 2023, arXiv:2305.11627), run by
sparsefast.prune.structural. Imports no torch: the `prune-structured` parser takes its choices (the tuples below),
defaults and preset names from here.

Every field is checked once, when the config is made (`__post_init__`; the dataclass is frozen, so every instance is
valid): bad values raise ValueError naming the field and the fix. Checks that need the model (layer ranges against
its depth, seqlen against its context) run in `prune_structured` / `plan_candidates` before any work.
`StructuralConfig.preset("llm-pruner")` gives the settings of LLM-Pruner's published runs (see `PRESETS`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

IMPORTANCES = ("random", "l2", "vector", "element1", "element2", "mix")
AGGREGATIONS = ("sum", "prod", "max", "last", "mean")
STRATEGIES = ("block", "channel", "layer")
RANKINGS = ("local", "global")
GQA_MODES = ("divisible", "kv_groups")
ROUNDINGS = ("half_up", "keep_floor")

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?:@\s*(\d+)\s*)?$")

# LLM-Pruner (github.com/horseee/LLM-Pruner) as published: scripts/llama_prune.sh and the README's LLaMA-7B command
# (hf_prune.py --block_wise --block_{attention,mlp}_layer_start 4 --block_{attention,mlp}_layer_end 30 --pruner_type
# taylor --taylor param_first), with hf_prune.py's defaults for everything those commands leave unset.
PRESETS: dict[str, dict[str, Any]] = {
    "llm-pruner": {
        "strategy": "block",          # --block_wise
        "importance": "element1",     # --pruner_type taylor --taylor param_first: Σ|W·∂L/∂W| per channel
        "aggregation": "sum",         # --grouping_strategy default 'sum'
        "ranking": "local",           # no --global_pruning
        "layers": "4-29@32",          # range(4, 30) of LLaMA-7B's 32 layers, scaled to the model's depth
        "gqa": "kv_groups",           # llama3.py (its only GQA path) removes whole KV groups (root k_proj)
        "nsamples": 10,               # --num_examples default 10
        "seqlen": 64,                 # get_examples('bookcorpus', ..., seq_len=64), fixed in hf_prune.py
        "seed": 42,                   # --seed default 42
        "rounding": "keep_floor",     # MetaPruner.prune_local: n - int(n·(1 - ratio)) channels, whole heads
    },
}


def _parse_spec(spec: str) -> tuple[int, int, int | None]:
    """'START-END' or 'START-END@DEPTH' (inclusive END) → (START, END + 1, DEPTH or None); ValueError if malformed."""
    m = _RANGE.match(str(spec))
    if m is None:
        raise ValueError(f"layers {spec!r} is not of the form START-END (inclusive, e.g. 3-27) or START-END@DEPTH "
                         "(a range of a DEPTH-layer model, scaled to this one, e.g. 4-29@32)")
    start, stop = int(m.group(1)), int(m.group(2)) + 1
    depth = int(m.group(3)) if m.group(3) is not None else None
    if start >= stop:
        raise ValueError(f"layers {spec!r} is empty: START must be ≤ END")
    if depth is not None and stop > depth:
        raise ValueError(f"layers {spec!r} ends past its {depth}-layer reference model: END must be < DEPTH")
    return start, stop, depth


def _scale(index: int, num_layers: int, depth: int) -> int:
    """index·num_layers/depth rounded half up, in exact integer arithmetic."""
    return (2 * index * num_layers + depth) // (2 * depth)


def parse_layer_range(spec: str | tuple[int, int] | None, num_layers: int,
                      option: str = "--layers") -> tuple[int, int]:
    """A layer range → (start, stop) half-open over the model's `num_layers` decoder layers.

    spec: 'START-END' inclusive (like LLM-Pruner's --block_*_layer_start with --block_*_layer_end = END + 1);
        'START-END@DEPTH': that range of a DEPTH-layer model mapped onto this one by scaling both ends by
        num_layers/DEPTH (start and the exclusive stop, each rounded half up), so '4-29@32' is 4-29 on 32 layers and
        4-27 on 30; a (start, stop) half-open tuple; or None: every layer but the first and the last (1, num_layers-1).
        That default is sparsefast's own; LLM-Pruner's scripts instead pass explicit ranges (see PRESETS).
    option: the CLI option named in errors.
    Raises ValueError when the range is malformed, empty or outside [0, num_layers).
    """
    if spec is None:
        if num_layers <= 2:
            raise ValueError(f"the default layer range skips the first and the last decoder layer, which leaves "
                             f"none of this model's {num_layers} decoder layers; pass --layers 0-{num_layers - 1} "
                             "to prune every layer")
        start, stop = 1, num_layers - 1
    elif isinstance(spec, tuple):
        start, stop = spec
    else:
        start, stop, depth = _parse_spec(spec)
        if depth is not None:
            start, stop = _scale(start, num_layers, depth), _scale(stop, num_layers, depth)
            if start >= stop:
                raise ValueError(f"{option} {spec} maps to no layer of this {num_layers}-layer model; "
                                 f"pass {option} START-END inside 0-{num_layers - 1}")
    if not (0 <= start < stop <= num_layers):
        raise ValueError(f"layer range {start}-{stop - 1} is outside the model's {num_layers} decoder layers "
                         f"(valid: 0-{num_layers - 1}); pass {option} START-END inside it")
    return start, stop


@dataclass(frozen=True)
class StructuralConfig:
    """What to remove and how to rank it (validated on construction; frozen).

    ratio: fraction of the prunable units removed (heads + MLP channels for `block`, hidden channels for `channel`,
        decoder layers inside `layers` for `layer`); in [0, 1).
    importance: random | l2 (weight magnitude) | vector (|Σ W·g| per unit, LLM-Pruner "vectorize") |
        element1 (Σ|W·g|, first-order Taylor per parameter, LLM-Pruner "param_first") | element2 (Σ|½W²·F|,
        F = diagonal Fisher from per-sample squared gradients, LLM-Pruner "param_second") | mix (Σ|W·g − ½W²·F|,
        LLM-Pruner "param_mix").
    aggregation: how a group's member scores (one per coupled weight slice) are combined: sum | prod | max | mean |
        last (the member executed last, e.g. down_proj columns; the paper's "last" that LLM-Pruner's code lacks).
        Heads are combined per channel, then summed over head_dim, as LLM-Pruner does (see importance.py).
    strategy: block (heads + MLP channels per layer) | channel (hidden dimension) | layer (whole decoder layers).
    layers: the decoder layers pruned (see `parse_layer_range` for the forms): both attention and MLP for `block`,
        the candidate layers for `layer`; channel pruning spans every layer. None: every layer but the first and
        the last (sparsefast's default, not LLM-Pruner's: its scripts pass explicit ranges).
    attn_layers, mlp_layers: `block` only: separate ranges for attention heads and MLP channels (LLM-Pruner's
        --block_attention_layer_* and --block_mlp_layer_*); None → `layers`.
    ranking: local (same ratio in every layer) | global (one ranking per kind across the layer range).
    gqa: divisible (drop the same number of query heads from every KV group, KV heads kept) |
        kv_groups (drop whole KV groups with their query heads).
    rounding: how many of n units a ratio removes: half_up (⌊ratio·n + ½⌋) | keep_floor (LLM-Pruner's MetaPruner:
        keep ⌊(1 − ratio)·n·w⌋ of the n·w channels, w = head_dim for heads and 1 otherwise, and remove the rest
        floored to whole heads; 20% of 1536 MLP channels removes 308 where half_up removes 307).
    allow_empty_layers: permit global ranking to remove every unit of a kind in a layer (otherwise ≥1 is kept).
    uniform: block only: prune every decoder layer, the first and the last included, with local ranking, so every
        layer keeps the same number of heads, KV heads and MLP channels and the result is a plain
        LlamaForCausalLM-family checkpoint (no structure.json) that any engine loads; no layer ranges.
    """

    ratio: float = 0.2
    importance: str = "element1"
    aggregation: str = "sum"
    strategy: str = "block"
    layers: str | None = None
    attn_layers: str | None = None
    mlp_layers: str | None = None
    ranking: str = "local"
    gqa: str = "divisible"
    rounding: str = "half_up"
    prune_attention: bool = True
    prune_mlp: bool = True
    nsamples: int = 10
    seqlen: int = 128
    seed: int = 0
    gradient_checkpointing: bool = True
    allow_empty_layers: bool = False
    uniform: bool = False

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> StructuralConfig:
        """The config of preset `name` (see PRESETS), with `overrides` applied on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown StructuralConfig field(s) {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        """Check every model-independent setting; raise ValueError naming the field and the fix."""
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}; e.g. --ratio 0.2 removes 20%")
        for name, value, allowed in (("importance", self.importance, IMPORTANCES),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("ranking", self.ranking, RANKINGS), ("gqa", self.gqa, GQA_MODES),
                                     ("rounding", self.rounding, ROUNDINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"nsamples must be ≥ 1 and seqlen ≥ 2; got {self.nsamples}, {self.seqlen}")
        if self.strategy == "block" and not (self.prune_attention or self.prune_mlp):
            raise ValueError("block strategy with prune_attention=False and prune_mlp=False removes nothing")
        for option, spec in (("--layers", self.layers), ("--attn-layers", self.attn_layers),
                             ("--mlp-layers", self.mlp_layers)):
            if isinstance(spec, str):
                try:
                    _parse_spec(spec)
                except ValueError as exc:
                    raise ValueError(f"{option}: {exc}") from None
        if self.uniform and (self.strategy != "block" or self.ranking != "local"):
            raise ValueError("--uniform needs --strategy block with --ranking local (channel and layer pruning "
                             "already leave every layer alike)")
        if self.uniform and (self.layers, self.attn_layers, self.mlp_layers) != (None, None, None):
            raise ValueError("--uniform prunes every layer, the first and the last included, so that all layers "
                             "keep the same widths; drop --layers / --attn-layers / --mlp-layers")
        if self.strategy != "block" and (self.attn_layers is not None or self.mlp_layers is not None):
            raise ValueError(f"attn_layers / mlp_layers apply to the block strategy only; with strategy "
                             f"{self.strategy!r} use --layers")

    def layer_ranges(self, num_layers: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(attention, MLP) half-open layer ranges on a model of `num_layers` decoder layers; None for a kind that
        is not pruned (prune_attention / prune_mlp False), whose range is then not checked either."""

        def resolve(spec: str | None, option: str) -> tuple[int, int]:
            if self.uniform:
                return 0, num_layers
            if spec is None:
                return parse_layer_range(self.layers, num_layers)
            return parse_layer_range(spec, num_layers, option)

        return (resolve(self.attn_layers, "--attn-layers") if self.prune_attention else None,
                resolve(self.mlp_layers, "--mlp-layers") if self.prune_mlp else None)

    def check_context(self, max_context: int | None) -> None:
        """Calibration windows of `seqlen` tokens must fit the model's context (only gradient importances use them)."""
        if self.needs_gradients and max_context is not None and self.seqlen > max_context:
            raise ValueError(f"seqlen {self.seqlen} exceeds the model's context of {max_context} tokens; "
                             f"use --seqlen {max_context} or less")

    @property
    def needs_gradients(self) -> bool:
        return self.importance in ("vector", "element1", "element2", "mix")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
