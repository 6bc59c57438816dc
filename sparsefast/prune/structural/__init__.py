"""LLM-Pruner-style structural pruning (Ma, Fang, Wang: "LLM-Pruner: On the Structural Pruning of Large Language
Models", NeurIPS 2023, arXiv:2305.11627): discover coupled groups by tracing, score them with Taylor importance on
calibration samples, remove the least important ones physically, save without pickle.

    report = prune_structured(model, tokenizer, StructuralConfig(ratio=0.2, importance="element1"), calib)
    sparsefast.models.save_structural(model, "out/", tokenizer=tokenizer, report=report)
    model, tokenizer = sparsefast.load("out/")

The checkpoint format (structure.json + safetensors) lives with the other checkpoint readers, in
sparsefast.models.structural; this package only prunes. Its settings, StructuralConfig (exported here too, with
prune_structured), live with the other configs in sparsefast.config.structural.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsefast.config.structural import StructuralConfig
from sparsefast.models.weights import check_finite_weights
from sparsefast.ops.int8_rows import refuse_quantized
from sparsefast.prune.structural.graph import StructureGraph, build_graph, decoder_layers
from sparsefast.prune.structural.importance import unit_importance
from sparsefast.prune.structural.slicing import (
    mask_dense,
    remove_layers,
    set_hidden_size,
    slice_units,
    update_layer_attributes,
)
from sparsefast.prune.structural.strategies import Plan, plan_candidates, select

__all__ = ["Selection", "StructuralConfig", "build_graph", "count_parameters", "macs_per_token", "mask_dense",
           "prune_structured", "remove_selected", "select_structured", "why_not_streamable"]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def macs_per_token(model: nn.Module, context: int = 0) -> dict[str, int]:
    """Multiply-accumulates per generated token: every Linear (incl. the LM head) once, plus attention's
    q·k and p·v over `context` cached tokens (2 · attention width · context per layer)."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    attn = sum(2 * info["attention_width"] * context for info in getattr(model, "sparsefast_layers", []) or [])
    return {"linear": linear, "attention": attn, "total": linear + attn}


def _layer_info(model: nn.Module, graph: StructureGraph, removed: list) -> list[dict]:
    info = update_layer_attributes(model, graph, removed)
    gone = {id(u) for u in removed}
    for entry in info:
        width = 0
        for g in graph.attention.get(entry["index"], []):
            if id(g.unit) not in gone:
                width += sum(m.index.numel() for q in g.queries if id(q) not in gone for m in q.members if m.dim == 1)
        entry["attention_width"] = width
    return info


def _removed_summary(graph: StructureGraph, removed: list) -> dict[str, Any]:
    per_layer: dict[int, dict[str, int]] = {}
    hidden = layers = 0
    for u in removed:
        if u.kind == "hidden":
            hidden += 1
            continue
        if u.kind == "layer":
            layers += 1
            continue
        entry = per_layer.setdefault(u.layer, {"query_heads": 0, "kv_heads": 0, "mlp_channels": 0})
        if u.kind == "mlp":
            entry["mlp_channels"] += 1
        elif u.kind == "query":
            entry["query_heads"] += 1
        else:
            group = next(g for g in graph.attention[u.layer] if g.unit is u)
            entry["kv_heads"] += 1
            entry["query_heads"] += len(group.queries)
    return {"per_layer": {str(k): v for k, v in sorted(per_layer.items())}, "hidden_channels": hidden,
            "decoder_layers": sorted(u.layer for u in removed if u.kind == "layer") if layers else []}


def _phase_done(progress: bool, what: str, since: float) -> float:
    """One progress line on stderr for a finished phase, with its elapsed time; returns the time now."""
    now = time.perf_counter()
    if progress:
        print(f"prune-structured: {what} ({now - since:.1f} s)", file=sys.stderr, flush=True)
    return now


@dataclass
class Selection:
    """What `select_structured` chose: the units to remove, with what `remove_selected` needs for its report."""
    graph: StructureGraph
    plan: Plan
    removed: list
    before: dict[str, Any]
    stats: dict[str, Any]
    seconds: dict[str, float]
    started: float


def prune_structured(model: nn.Module, tokenizer, config: StructuralConfig,
                     calib: torch.Tensor | None = None, *, calib_source: str = "c4",
                     data_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Prune `model` in place per `config`; returns the report written to sparsefast.json.

    calib: LongTensor [nsamples, seqlen] of token ids for the gradient importances; None → drawn from
    `calib_source` with `tokenizer` (only when the importance needs gradients). `config` is valid by construction;
    every check that needs the model runs once, before any gradient is computed or weight touched: finite weights,
    config.seqlen against the model's context, and the plan (layer ranges, ratios) in `plan_candidates`.
    progress: one line on stderr per finished phase (graph, calibration, importance, pruning) with its time, and a
    bar over the calibration samples of the gradient pass.
    """
    selection = select_structured(model, tokenizer, config, calib, calib_source=calib_source, data_dir=data_dir,
                                  progress=progress)
    return remove_selected(model, config, selection, progress=progress)


def select_structured(model: nn.Module, tokenizer, config: StructuralConfig, calib: torch.Tensor | None = None, *,
                      calib_source: str = "c4", data_dir: str | None = None, progress: bool = True,
                      layer_stream: Any = None) -> Selection:
    """The first half of `prune_structured`: trace, plan, score and choose the units to remove; no weight changes.

    layer_stream (sparsefast.models.streamed.LayerStream, the model's decoder layers on disk; the block strategy
    only): the weights are checked finite on disk (one read pass, after the plan and the calibration data) and the
    importances computed one layer at a time (importance.streamed_channel_scores, the same numbers)."""
    refuse_quantized(model, "prune-structured")  # slicing would leave the int8 scales behind
    if layer_stream is None:
        check_finite_weights(model)  # a NaN would spread through the Taylor importances into a "pruned" model
    else:
        _check_streamable(config)
    if calib is None:
        config.check_context(getattr(getattr(model, "config", None), "max_position_embeddings", None))
    t0 = time.perf_counter()
    graph = build_graph(model)
    plan = plan_candidates(model, graph, config)
    t_graph = _phase_done(progress, f"graph: {len(plan.units)} candidate units traced", t0) - t0
    t_calib = 0.0
    if config.needs_gradients and calib is None:
        from sparsefast.data import get_calibration

        t = time.perf_counter()
        calib = get_calibration(calib_source, tokenizer, config.nsamples, config.seqlen, config.seed, data_dir)
        t_calib = _phase_done(progress, f"calibration: {config.nsamples} samples x {config.seqlen} tokens from "
                                        f"{calib_source}", t) - t
    if layer_stream is not None:  # the weights on disk, checked once the plan and the data are known to be good
        from sparsefast.models.streamed import check_finite_on_disk

        check_finite_on_disk(layer_stream.plan, progress=progress)
    model.sparsefast_layers = _layer_info(model, graph, [])
    before = {"parameters": count_parameters(model), "macs_per_token": macs_per_token(model, config.seqlen)}
    _, layers = decoder_layers(model)
    t1 = time.perf_counter()
    # the gradient pass runs one model forward (and backward) per calibration sample: a pre-hook on the model
    # advances the bar without threading a callback through the importance code (from disk: the model runs twice
    # per sample, before and after the layers' forward pass)
    runs = len(calib) * (2 if layer_stream is not None else 1) if config.needs_gradients else 0
    bar = tqdm(total=runs, desc="importance: gradients", unit="pass", disable=not progress or not runs, leave=False)

    def count_sample(*_: Any) -> None:  # returns None: a pre-hook's return value would replace the inputs
        bar.update(1)

    hook = model.register_forward_pre_hook(count_sample)
    try:
        scores, imp_stats = unit_importance(model, plan.units, config, calib, layers, layer_stream=layer_stream)
    finally:
        hook.remove()
        bar.close()
    removed = select(plan, scores, config)
    t2 = _phase_done(progress, f"importance: {config.importance} over {len(plan.units)} units", t1)
    return Selection(graph, plan, removed, before, imp_stats,
                     {"graph": t_graph, "calibration": t_calib, "importance": t2 - t1}, t0)


def why_not_streamable(config: StructuralConfig) -> str | None:
    """Why `config` cannot prune with the decoder layers on disk (only the block strategy can), or None."""
    if config.strategy == "block":
        return None
    what = ("channel pruning narrows the embeddings and every layer" if config.strategy == "channel"
            else "layer pruning renumbers the decoder layers")
    return f"{what}; only the block strategy prunes from disk: use --from-disk off"


def _check_streamable(config: StructuralConfig) -> None:
    why = why_not_streamable(config)
    if why is not None:
        raise ValueError(why)


def remove_selected(model: nn.Module, config: StructuralConfig, selection: Selection, *, progress: bool = True,
                    layer_stream: Any = None) -> dict[str, Any]:
    """The second half of `prune_structured`: remove the selected units physically; returns the report.

    layer_stream: each decoder layer is read, sliced and written (by the stream's writer, whose tensors have the
    shapes `pruned_shapes` gives) in turn."""
    graph, plan, removed = selection.graph, selection.plan, selection.removed
    if layer_stream is not None:
        _check_streamable(config)
        if layer_stream.writer is None:
            raise ValueError("remove_selected: the layer stream has no writer, so the pruned layers would be lost")
    t2 = time.perf_counter()
    if config.strategy == "layer":
        gone = sorted(u.layer for u in removed)
        info = [e for e in _layer_info(model, graph, []) if e["index"] not in gone]
        remove_layers(model, gone)
        for i, e in enumerate(info):
            e["index"] = i
    else:
        if layer_stream is None:
            slice_units(model, removed)
        else:
            _, layers = decoder_layers(model)
            per_layer: dict[int, list] = {}
            for u in removed:
                per_layer.setdefault(u.layer, []).append(u)
            for i, layer in enumerate(tqdm(layers, desc="pruning: layers", disable=not progress, leave=False)):
                written = False
                try:
                    layer_stream.load(i, layer)
                    slice_units(model, per_layer.get(i, []))
                    layer_stream.release(i, layer)
                    written = True
                finally:
                    if not written:  # a failed read or slice: drop the layer, write nothing
                        layer_stream.release(i, layer, write=False)
        info = _layer_info(model, graph, removed)
        if config.strategy == "channel":
            set_hidden_size(model)
    model.sparsefast_layers = info
    t3 = _phase_done(progress, f"pruning: removed {len(removed)} of {len(plan.units)} units", t2)
    before = selection.before
    after = {"parameters": count_parameters(model), "macs_per_token": macs_per_token(model, config.seqlen)}
    return {
        "method": "llm-pruner-structural",
        "config": config.to_dict(),
        "layer_range": list(plan.layer_range),
        **({"layer_ranges": {"attention": plan.attn_range and list(plan.attn_range),
                             "mlp": plan.mlp_range and list(plan.mlp_range)}} if config.strategy == "block" else {}),
        "groups_found": {"hidden": len(graph.hidden), "attention_groups": sum(map(len, graph.attention.values())),
                         "query_heads": sum(graph.heads(i)[0] for i in graph.attention),
                         "mlp_channels": sum(map(len, graph.mlp.values())), "unclassified": graph.other},
        "removed": _removed_summary(graph, removed),
        "layers": info,
        "before": before,
        "after": after,
        "parameter_ratio": after["parameters"] / before["parameters"],
        "importance": selection.stats,
        "seconds": {**selection.seconds, "slicing": t3 - t2, "total": t3 - selection.started},
    }
