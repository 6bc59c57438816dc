"""Dependency graph of a causal LM: coupled groups discovered by tracing (LLM-Pruner, Ma et al. 2023, §3.1).

`build_graph(model)` traces channel data flow (trace.py) and turns connected components into prunable units:

* hidden — one unit per residual-stream channel: embedding columns, every residual producer's rows (o_proj,
  down_proj, ...), every consumer's columns (q/k/v, gate/up, lm_head), norm weights; a tied head is the same weight.
* attention — per decoder layer, one unit per KV head with all the query heads that read it (one head in MHA).
  Each KV group is split into query-head sub-units by a second trace that holds the narrower sibling projections
  (k/v, which read the same input as q but have fewer rows) constant: q rows + o_proj columns of one head.
* mlp — per decoder layer, one unit per intermediate channel (gate/up rows with the down_proj column).

Components that reach the logits are never prunable. Nothing here names a module or a family: adapters may only
hint the decoder layer list (`sparsefast.models.get_adapter(model).decoder_layers`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sparsefast.models import get_adapter
from sparsefast.prune.structural.trace import NodeSpace, connected_components, trace_channels


@dataclass(slots=True)
class Member:
    """One coupled slice: `param` (canonical name) indexed along `dim` by `index` (sorted int64; read-only: equal
    indices are one shared tensor, see build_graph)."""

    param: str
    module: str
    dim: int
    index: torch.Tensor
    order: int


@dataclass
class Unit:
    kind: str                      # "hidden" | "attention" | "query" | "mlp"
    layer: int | None
    members: list[Member]


@dataclass
class AttentionGroup:
    unit: Unit                     # the whole KV group (or head, in MHA)
    queries: list[Unit]            # its query-head sub-units (the unit itself in MHA)


@dataclass
class StructureGraph:
    layers_prefix: list[str]
    hidden: list[Unit] = field(default_factory=list)
    attention: dict[int, list[AttentionGroup]] = field(default_factory=dict)
    mlp: dict[int, list[Unit]] = field(default_factory=dict)
    attention_module: dict[int, str] = field(default_factory=dict)
    mlp_module: dict[int, str] = field(default_factory=dict)
    other: int = 0                 # components that fit none of the kinds (reported, never pruned)

    @property
    def num_layers(self) -> int:
        return len(self.layers_prefix)

    def heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of `layer` as discovered."""
        groups = self.attention.get(layer, [])
        return sum(len(g.queries) for g in groups), len(groups)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder layers: the adapter's hint, else the longest ModuleList of
    modules of one class."""
    try:
        layers = get_adapter(model).decoder_layers(model)
        for name, mod in model.named_modules():
            if mod is layers:
                return name, mod
    except (AttributeError, ValueError, KeyError, TypeError):  # no adapter for this family: search instead
        pass
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found; is this a causal LM?")
    return best


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _slices(mods: dict[str, nn.Module], module: str, role: str, idx: np.ndarray, names: dict[int, str],
            shared: dict[bytes, torch.Tensor] | None = None) -> list:
    """(param name, dim, index) slices of `module` touched by channels `idx` of `role`. `shared`: one index tensor
    per distinct value (a model has a member per MLP channel per layer: hundreds of thousands of one-element
    tensors, ~1.7 KB each, would be most of a streamed run's memory; the values repeat across modules and layers)."""
    mod = mods[module]
    values = np.sort(idx).astype(np.int64)
    index = None if shared is None else shared.get(values.tobytes())
    if index is None:
        index = torch.from_numpy(values)
        if shared is not None:
            shared[values.tobytes()] = index
    if isinstance(mod, nn.Linear):
        if role == "in":
            return [(names[id(mod.weight)], 1, index)]
        out = [(names[id(mod.weight)], 0, index)]
        return out + ([(names[id(mod.bias)], 0, index)] if mod.bias is not None else [])
    if isinstance(mod, nn.Embedding):
        return [(names[id(mod.weight)], 1, index)]
    return [(names[id(p)], 0, index) for p in mod.parameters(recurse=False)]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def build_graph(model: nn.Module, *, seq_len: int = 3) -> StructureGraph:
    """Trace `model` and return its prunable units (see the module docstring). Works on any device/dtype."""
    prefix, layers = decoder_layers(model)
    layer_prefix = [f"{prefix}.{i}." for i in range(len(layers))]
    nodes = NodeSpace()
    mods = dict(model.named_modules())
    first = trace_channels(model, nodes, seq_len=seq_len)
    comp = connected_components(nodes.total, first.edges)
    own, keys = nodes.owner()
    names = _param_names(model)
    # tied weights: two (module, role) views of one parameter slice are the same channels
    extra = []
    seen: dict[tuple[str, int], int] = {}
    for k, key in enumerate(keys):
        for pname, dim, _ in _slices(mods, key[0], key[1], np.array([0]), names):
            a = nodes.ranges[key][0]
            if (pname, dim) in seen:
                other = keys[seen[(pname, dim)]]
                b = nodes.ranges[other][0]
                n = nodes.ranges[key][1] - a
                extra.append(np.stack([np.arange(a, a + n), np.arange(b, b + n)], 1))
            else:
                seen[(pname, dim)] = k
    if extra:
        comp = connected_components(nodes.total, np.concatenate([first.edges, *extra]))
    fixed = set(comp[first.output_nodes].tolist())
    graph = StructureGraph(layers_prefix=layer_prefix)
    members_of = defaultdict(lambda: defaultdict(list))       # component → (module, role) → channel indices
    for node in range(nodes.total):
        c = comp[node]
        if c not in fixed:
            key = keys[own[node]]
            members_of[c][key].append(node - nodes.ranges[key][0])

    def layer_of(module: str) -> int | None:
        for i, p in enumerate(layer_prefix):
            if module.startswith(p):
                return i
        return None

    shared_index: dict[bytes, torch.Tensor] = {}

    def make_unit(kind, layer, groups) -> Unit:
        members, done = [], set()
        for (module, role), idx in groups.items():
            for pname, dim, index in _slices(mods, module, role, np.asarray(idx), names, shared_index):
                if (pname, dim) not in done:
                    done.add((pname, dim))
                    members.append(Member(pname, module, dim, index, first.order.get(module, -1)))
        members.sort(key=lambda m: (m.order, m.param, m.dim))
        return Unit(kind, layer, members)

    attention_comps: dict[int, list] = defaultdict(list)
    for c, groups in members_of.items():
        modules = {m for m, _ in groups}
        if any(isinstance(mods[m], nn.Embedding) for m in modules):
            graph.hidden.append(make_unit("hidden", None, groups))
            continue
        layer_ids = {layer_of(m) for m in modules}
        if len(layer_ids) != 1 or None in layer_ids:
            graph.other += 1
            continue
        layer = layer_ids.pop()
        if max(len(v) for v in groups.values()) > 1:
            attention_comps[layer].append((c, groups))
        else:
            graph.mlp.setdefault(layer, []).append(make_unit("mlp", layer, groups))
            graph.mlp_module.setdefault(layer, _common_prefix(sorted(modules)))

    shared = _shared_producers(mods, attention_comps, first.linear_inputs)
    sub = comp
    if shared:
        second = trace_channels(model, nodes, constant_outputs=frozenset(shared), seq_len=seq_len)
        sub = connected_components(nodes.total, np.concatenate([second.edges, *extra]) if extra else second.edges)
    for layer, comps in sorted(attention_comps.items()):
        groups_out = []
        for c, groups in sorted(comps, key=lambda cg: min(min(v) + nodes.ranges[k][0] for k, v in cg[1].items())):
            parts: dict[int, dict] = defaultdict(dict)
            for key, idx in groups.items():
                if key[0] in shared and key[1] == "out":
                    continue
                start = nodes.ranges[key][0]
                for i in idx:
                    parts[sub[start + i]].setdefault(key, []).append(i)
            queries = [make_unit("query", layer, g) for _, g in sorted(parts.items())]
            unit = make_unit("attention", layer, groups)
            groups_out.append(AttentionGroup(unit, queries if shared else [unit]))
        graph.attention[layer] = groups_out
        graph.attention_module[layer] = _common_prefix(sorted({m for _, g in comps for m, _ in g}))
    for layer in graph.mlp:
        graph.mlp[layer].sort(key=lambda u: int(u.members[0].index[0]))
    graph.hidden.sort(key=lambda u: int(u.members[0].index[0]))
    return graph


def _shared_producers(mods: dict[str, nn.Module], attention_comps: dict, linear_inputs: dict[str, int]) -> set[str]:
    """Linears whose output rows in an attention component are fewer than a sibling's (same input tensor):
    the K/V projections of grouped-query attention."""
    shared: set[str] = set()
    for comps in attention_comps.values():
        for _, groups in comps:
            rows = {m: len(idx) for (m, role), idx in groups.items()
                    if role == "out" and isinstance(mods[m], nn.Linear)}
            by_input = defaultdict(list)
            for m, n in rows.items():
                by_input[linear_inputs.get(m)].append((m, n))
            for siblings in by_input.values():
                widest = max(n for _, n in siblings)
                shared.update(m for m, n in siblings if n < widest)
    return shared
