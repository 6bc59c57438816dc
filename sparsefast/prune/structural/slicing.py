"""Physical removal of pruned groups (LLM-Pruner, Ma et al. 2023): smaller Linears, fewer heads, smaller MLPs,
narrower hidden size, fewer decoder layers — a plain dense transformers model afterwards.

All kept rows/columns of one decoder layer are gathered with one `structured_gather` call (one CUDA launch on GPU).
Module attributes that forward() reads are updated per layer (num_heads / num_key_value_heads /
num_key_value_groups on attention, intermediate_size on MLPs, in/out_features, normalized_shape). `mask_dense`
zeroes the same slices in place instead: the pruned model's outputs equal the masked dense model's (exactly for
heads, MLP channels and layers; for hidden channels a norm's statistic then averages over fewer channels).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from sparsefast.models.structural import HEAD_ATTRS, MLP_ATTRS, replace_parameter, sync_module_shapes
from sparsefast.ops.structured_gather import structured_gather
from sparsefast.prune.structural.graph import StructureGraph, Unit, decoder_layers


def removed_index(units: list[Unit]) -> dict[tuple[str, int], torch.Tensor]:
    """(param, dim) → sorted unique indices removed by `units`."""
    acc: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for u in units:
        for m in u.members:
            acc[(m.param, m.dim)].append(m.index)
    return {k: torch.cat(v).unique() for k, v in acc.items()}


@torch.no_grad()
def mask_dense(model: nn.Module, units: list[Unit], layers: list[int] = ()) -> None:
    """Zero, in place, every weight slice of `units` and every parameter of decoder `layers`."""
    params = dict(model.named_parameters())
    for (name, dim), idx in removed_index(units).items():
        p = params[name]
        p.index_fill_(dim, idx.to(p.device), 0)
    if layers:
        _, mods = decoder_layers(model)
        for i in layers:
            for p in mods[i].parameters():
                p.zero_()


@torch.no_grad()
def slice_units(model: nn.Module, units: list[Unit]) -> None:
    """Physically remove `units` (one structured_gather per decoder layer, one for the rest)."""
    params = dict(model.named_parameters())
    buckets: dict[int, list] = defaultdict(list)
    prefix, layers = decoder_layers(model)
    for (name, dim), idx in sorted(removed_index(units).items()):
        p = params[name]
        keep = torch.ones(p.shape[dim], dtype=torch.bool)
        keep[idx] = False
        key = int(name[len(prefix) + 1:].split(".")[0]) if name.startswith(prefix + ".") else -1
        buckets[key].append((name, dim, keep.nonzero().flatten().to(p.device)))
    for items in buckets.values():
        # a weight may lose rows and columns (hidden + heads): gather one axis per round
        while items:
            first, seen, rest = [], set(), []
            for it in items:
                (rest if it[0] in seen else first).append(it)
                seen.add(it[0])
            cur = {n: params[n] for n, _, _ in first}
            outs = structured_gather([cur[n].data.contiguous() for n, _, _ in first], [d for _, d, _ in first],
                                     [i for _, _, i in first])
            for (n, _, _), new in zip(first, outs):
                replace_parameter(model, cur[n], new)
                params = dict(model.named_parameters())
            items = rest
    sync_module_shapes(model)


def update_layer_attributes(model: nn.Module, graph: StructureGraph, removed: list[Unit]) -> list[dict]:
    """Set per-layer head counts / MLP width on the modules; returns the per-layer structure after pruning."""
    gone = {id(u) for u in removed}
    info = []
    for layer in range(graph.num_layers):
        groups = graph.attention.get(layer, [])
        nq = nkv = 0
        for g in groups:
            if id(g.unit) in gone:
                continue
            nkv += 1
            nq += sum(1 for q in g.queries if id(q) not in gone)
        mlp = sum(1 for u in graph.mlp.get(layer, []) if id(u) not in gone)
        entry = {"index": layer, "num_attention_heads": nq, "num_key_value_heads": nkv, "intermediate_size": mlp}
        if groups:
            attn = model.get_submodule(graph.attention_module[layer])
            values = {"num_heads": nq, "num_attention_heads": nq, "num_key_value_heads": nkv,
                      "num_key_value_groups": nq // max(nkv, 1)}
            for attr in HEAD_ATTRS:
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, values[attr])
        if layer in graph.mlp_module:
            mlp_mod = model.get_submodule(graph.mlp_module[layer])
            for attr in MLP_ATTRS:
                if isinstance(getattr(mlp_mod, attr, None), int):
                    setattr(mlp_mod, attr, mlp)
        info.append(entry)
    return info


def remove_layers(model: nn.Module, layers: list[int]) -> None:
    """Delete decoder `layers`, renumber `layer_idx` (KV-cache slots) and shrink the config."""
    if not layers:
        return
    _, mods = decoder_layers(model)
    old_count = len(mods)
    keep = [m for i, m in enumerate(mods) if i not in set(layers)]
    for i in sorted(layers, reverse=True):
        del mods[i]
    for new_idx, layer in enumerate(keep):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.num_hidden_layers = len(mods)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and types:
            if len(types) == old_count:
                types = [t for i, t in enumerate(types) if i not in set(layers)]
            cfg.layer_types = (types + types[-1:] * len(mods))[:len(mods)]  # one entry per remaining layer


def set_hidden_size(model: nn.Module) -> None:
    """After channel-wise pruning: config.hidden_size from the embedding, head_dim pinned explicitly."""
    cfg = model.config
    if getattr(cfg, "head_dim", None) is None:
        raise ValueError("channel-wise pruning needs an explicit config.head_dim")
    cfg.hidden_size = model.get_input_embeddings().embedding_dim


def pruned_shapes(model: nn.Module, units: list[Unit]) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of `model` once `units` are removed (what slice_units leaves), by name."""
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    for (name, dim), idx in removed_index(units).items():
        shapes[name][dim] -= idx.numel()
    return {name: tuple(shape) for name, shape in shapes.items()}
