"""What to remove: block-wise, channel-wise and layer-wise strategies (LLM-Pruner, Ma et al. 2023, §3.2 / §4).

Counts follow `config.rounding`: half_up is ratio·n rounded half up (0.25 of 2 query heads per KV group removes 1);
keep_floor is LLM-Pruner's MetaPruner rule, computed on channels: of n units of w channels each (w = head_dim for
heads, 1 for MLP / hidden channels and layers) it keeps int(n·w·(1 − ratio)) channels and removes the rest, floored
to whole units (ratio 0.2: 6 of 32 heads of 128 channels, 308 of 1536 MLP channels, 0 of 3 KV groups of 64).

* block   — attention heads of the layers in `attn_layers` and MLP channels of those in `mlp_layers` (both default to
  `layers`, whose own default, every layer but the first and the last, is sparsefast's: LLM-Pruner's scripts pass
  explicit ranges): per layer ratio·n units of each kind (local), or one ranking over the range (global;
  at least one unit per kind and layer is kept unless allow_empty_layers). `uniform` makes both ranges every layer
  (`StructuralConfig.layer_ranges`), so local ranking leaves all layers the same widths: a plain config.
  GQA: `divisible` removes the same number of query heads (ratio·group size) from every KV group and keeps every KV
  head, so num_heads stays a multiple of num_key_value_heads; `kv_groups` removes whole KV heads with their query
  heads. MHA (one query per group) is the same under both.
* channel — ratio·hidden residual-stream channels (embeddings, norms, every residual producer/consumer).
  Needs a config with an explicit head_dim (Llama/Qwen2/Mistral): OPT and GPT-NeoX derive head size from hidden.
* layer   — ratio·len(range) whole decoder layers inside `layers`, ranked by their summed importance.

`plan_candidates` checks everything that can be checked without data (before any gradient is computed);
`select` ranks the scored candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsefast.config.structural import StructuralConfig, parse_layer_range
from sparsefast.prune.structural.graph import Member, StructureGraph, Unit


@dataclass
class Bucket:
    """Units ranked against each other; `remove` of them go (local), or the bucket joins a global pool."""

    kind: str
    layer: int | None
    units: list[Unit]
    remove: int
    group: int | None = None      # KV group index for GQA-divisible query buckets


@dataclass
class Plan:
    strategy: str
    buckets: list[Bucket] = field(default_factory=list)
    layer_range: tuple[int, int] = (0, 0)          # every layer with a candidate (attention or MLP)
    attn_range: tuple[int, int] | None = None      # block: the attention and MLP ranges (None: kind not pruned)
    mlp_range: tuple[int, int] | None = None

    @property
    def units(self) -> list[Unit]:
        return [u for b in self.buckets for u in b.units]


def _count(ratio: float, n: int, rounding: str, width: int = 1) -> int:
    """Units removed out of n units of `width` channels each (see the module docstring for the two roundings).

    half_up avoids Python's round(), which sends 0.5 to 0 and 2.5 to 2; keep_floor evaluates LLM-Pruner's
    `n - int(n * (1 - ratio))` in the same floating-point order, so it removes exactly as many as LLM-Pruner.
    """
    if rounding == "keep_floor":
        channels = n * width
        return (channels - int(channels * (1 - ratio))) // width
    return int(math.floor(ratio * n + 0.5))


def _head_width(unit: Unit) -> int:
    """Channels per head of an attention or query unit: its narrowest member (one head's q rows / o_proj columns,
    or the single K/V head of a KV group)."""
    return min(m.index.numel() for m in unit.members)


def plan_candidates(model: nn.Module, graph: StructureGraph, config: StructuralConfig) -> Plan:
    """Candidate buckets for `config` on `model`; raises ValueError on any request this model cannot satisfy (layer
    range outside it, a ratio that would remove every unit of a kind), before any work."""
    r = float(config.ratio)
    if config.strategy == "channel":  # the hidden dimension spans every layer: no layer range
        plan = Plan(config.strategy, layer_range=(0, graph.num_layers))
        cfg = getattr(model, "config", None)
        if getattr(cfg, "head_dim", None) is None:
            raise ValueError(f"channel-wise pruning needs a config with an explicit head_dim; "
                             f"{type(cfg).__name__} derives head size from hidden_size. Use --strategy block")
        n = _count(r, len(graph.hidden), config.rounding)
        if n >= len(graph.hidden):
            raise ValueError(f"ratio {r} would remove every hidden channel; lower --ratio")
        plan.buckets.append(Bucket("hidden", None, graph.hidden, n))
        return plan
    if config.strategy == "layer":
        start, stop = parse_layer_range(config.layers, graph.num_layers)
        plan = Plan(config.strategy, layer_range=(start, stop))
        n = _count(r, stop - start, config.rounding)
        if n >= graph.num_layers:
            raise ValueError(f"ratio {r} over layers {start}-{stop - 1} would remove every decoder layer")
        params = dict(model.named_parameters())
        units = []
        for i in range(start, stop):
            members = [Member(name, name.rsplit(".", 1)[0], 0, torch.arange(p.shape[0]), 0)
                       for name, p in params.items() if name.startswith(graph.layers_prefix[i])]
            units.append(Unit("layer", i, members))
        plan.buckets.append(Bucket("layer", None, units, n))
        return plan
    attn_range, mlp_range = config.layer_ranges(graph.num_layers)
    spans = [rng for rng in (attn_range, mlp_range) if rng is not None]
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    plan = Plan(config.strategy, layer_range=(start, stop), attn_range=attn_range, mlp_range=mlp_range)
    for layer in range(start, stop):
        groups = graph.attention.get(layer, [])
        if config.prune_attention and groups and attn_range[0] <= layer < attn_range[1]:
            per_group = len(groups[0].queries)
            gqa = per_group > 1 and any(g.queries[0] is not g.unit for g in groups)
            if gqa and config.gqa == "divisible":
                if any(len(g.queries) != per_group for g in groups):
                    raise ValueError(f"layer {layer}: KV groups of unequal size; use --gqa kv_groups")
                k = _count(r, per_group, config.rounding, _head_width(groups[0].queries[0]))
                if k >= per_group:
                    raise ValueError(f"ratio {r} would remove all {per_group} query heads of every KV group in layer "
                                     f"{layer} (every head of the layer); lower --ratio")
                for gi, g in enumerate(groups):
                    plan.buckets.append(Bucket("query", layer, g.queries, k, gi))
            else:
                k = _count(r, len(groups), config.rounding, _head_width(groups[0].unit))
                if k >= len(groups):
                    what = "KV group" if gqa else "head"
                    raise ValueError(f"ratio {r} would remove every {what} ({len(groups)}) of layer {layer}; "
                                     "lower --ratio or leave attention out")
                plan.buckets.append(Bucket("attention", layer, [g.unit for g in groups], k))
        mlp = graph.mlp.get(layer, [])
        if config.prune_mlp and mlp and mlp_range[0] <= layer < mlp_range[1]:
            k = _count(r, len(mlp), config.rounding)
            if k >= len(mlp):
                raise ValueError(f"ratio {r} would remove every MLP channel of layer {layer}; lower --ratio")
            plan.buckets.append(Bucket("mlp", layer, mlp, k))
    if not plan.buckets:
        raise ValueError(f"nothing to prune in layers {start}-{stop - 1} with strategy {config.strategy!r}")
    return plan


def select(plan: Plan, scores: list[float], config: StructuralConfig) -> list[Unit]:
    """Units to remove given importance `scores` aligned with `plan.units` (lowest importance goes first).

    Ties break by unit order (stable), so results are deterministic.
    """
    pos, removed = 0, []
    scored: list[tuple[Bucket, list[tuple[float, int, Unit]]]] = []
    for b in plan.buckets:
        items = [(scores[pos + i], i, u) for i, u in enumerate(b.units)]
        pos += len(b.units)
        scored.append((b, items))
    if config.ranking == "local" or plan.strategy != "block":
        for b, items in scored:
            removed += [u for _, _, u in sorted(items, key=lambda t: (t[0], t[1]))[:b.remove]]
        return removed
    # global: one pool per kind; a query bucket's share is rounded to whole heads per KV group
    for kind in ("attention", "query", "mlp"):
        pool = [(s, bi, i, u) for bi, (b, items) in enumerate(scored) if b.kind == kind for s, i, u in items]
        if not pool:
            continue
        budget = sum(b.remove for b, _ in scored if b.kind == kind)
        chosen = sorted(pool, key=lambda t: (t[0], t[1], t[2]))[:budget]
        per_bucket: dict[int, int] = {}
        for _, bi, _, _ in chosen:
            per_bucket[bi] = per_bucket.get(bi, 0) + 1
        if kind == "query":
            per_bucket = _even_per_layer(per_bucket, scored)
        for bi, n in per_bucket.items():
            b, items = scored[bi]
            if not config.allow_empty_layers:
                n = min(n, len(b.units) - 1)
            removed += [u for _, _, u in sorted(items, key=lambda t: (t[0], t[1]))[:n]]
    return removed


def _even_per_layer(per_bucket: dict[int, int], scored: list) -> dict[int, int]:
    """Spread a layer's query-head budget evenly over its KV groups (floor), keeping GQA divisibility."""
    by_layer: dict[int, list[int]] = {}
    for bi, (b, _) in enumerate(scored):
        if b.kind == "query":
            by_layer.setdefault(b.layer, []).append(bi)
    out = {}
    for buckets in by_layer.values():
        total = sum(per_bucket.get(bi, 0) for bi in buckets)
        for bi in buckets:
            out[bi] = total // len(buckets)
    return out
