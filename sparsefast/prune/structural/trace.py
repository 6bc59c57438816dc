"""Channel-label tracing: the data-flow half of the dependency graph (LLM-Pruner, Ma et al. 2023, §3.1).

Every channel of every Linear (its input and output features), Embedding (its output features) and per-channel
normalisation module (weight/bias of size C) is a node. One forward pass on a few tokens runs under a
TorchDispatchMode that carries, next to every tensor, an int64 tensor of the same shape holding the node each
element comes from (-1: no channel, e.g. rotary tables or masks). Each aten op maps labels the way it maps data:

* shape ops (view, transpose, expand, slice, cat, split, index...) are applied to the label tensor itself;
* pointwise ops couple the labels of the inputs element by element (residual adds, SiLU(gate)·up, ...);
* reductions and contractions (softmax, bmm) couple every label along the reduced axis (q·k couples a head's
  channels with the KV head it reads; p·v couples that with v and the attention output);
* Linear / Embedding / norm modules are atomic: their input labels couple to their input nodes, their outputs
  carry their own output nodes. A norm's statistic (mean of squares) is treated as non-structural, as LLM-Pruner
  does: removing a channel keeps the op valid.

Coupled pairs become edges; connected components are the fixed point of LLM-Pruner's dependency rule. An op with
channel-labelled inputs and no rule raises, so a new architecture fails loudly instead of grouping wrongly.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparsefast.models.structural import is_norm_module

aten = torch.ops.aten

# applied to the label tensor exactly as to the data (only args[0] carries labels; the rest are sizes / indices)
_SHAPE_OPS = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze,
              aten.expand, aten.slice, aten.select, aten.t, aten.alias, aten.clone, aten.cat, aten.stack, aten.split,
              aten.split_with_sizes, aten.unbind, aten.narrow, aten.index_select, aten.index, aten.repeat,
              aten.detach, aten.lift_fresh, aten.unflatten, aten.flatten, aten.expand_as, aten._reshape_alias}
_UNARY_OPS = {aten._to_copy, aten.to, aten.dropout, aten.native_dropout, aten.contiguous}
_NO_LABEL_OPS = {aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
                 aten.sym_size, aten.sym_numel, aten.sym_stride, aten.is_nonzero, aten._local_scalar_dense,
                 aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.isnan, aten.isinf, aten.any, aten.all}
_SAME_SHAPE_REDUCTIONS = {aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax}
_REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.norm,
               aten.linalg_vector_norm}
_CONTRACTIONS = {aten.bmm, aten.mm, aten.baddbmm, aten.addmm}


@dataclass
class NodeSpace:
    """Node ids per (module name, role). role: 'in' | 'out' (Linear), 'out' (Embedding), 'ch' (norm)."""

    ranges: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    total: int = 0

    def add(self, name: str, role: str, size: int) -> torch.Tensor:
        self.ranges[(name, role)] = (self.total, self.total + size)
        self.total += size
        return torch.arange(self.total - size, self.total)

    def owner(self) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """For every node the index of its (module, role) in the returned key list, and the list."""
        keys = list(self.ranges)
        own = np.empty(self.total, dtype=np.int64)
        for i, k in enumerate(keys):
            a, b = self.ranges[k]
            own[a:b] = i
        return own, keys


@dataclass
class TraceResult:
    edges: np.ndarray                 # [E, 2] coupled node pairs
    output_nodes: np.ndarray          # nodes that reach the model's logits (never prunable)
    order: dict[str, int]             # module name → first execution index
    linear_inputs: dict[str, int]     # Linear name → id of the input tensor it read (siblings share one)


class _LabelMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.edges: list[torch.Tensor] = []
        self.bypass = 0

    # -- label bookkeeping -------------------------------------------------------------------------------------
    def get(self, t) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.labels.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def full(self, t: torch.Tensor) -> torch.Tensor:
        lab = self.get(t)
        return torch.full(t.shape, -1, dtype=torch.long) if lab is None else lab

    def set(self, t, lab: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and lab is not None:
            self.labels[id(t)] = (t, lab)

    def link(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Couple a and b element-wise (same shape); return one label per element (-1 where both are -1)."""
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self.edges.append(((a[keep] << 32) | b[keep]).unique())  # pairs packed in one int64: 1-D unique
        return torch.where(a >= 0, a, b)

    def reduce(self, lab: torch.Tensor, dims: list[int]) -> torch.Tensor:
        """Couple every label along `dims`; return the representative with those dims kept as size 1."""
        rep = lab
        for d in dims:
            rep = rep.amax(d, keepdim=True)
        self.link(lab, rep.expand_as(lab).contiguous())
        return rep

    # -- dispatch ----------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.bypass:
            return out
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        flat += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if all(self.get(t) is None for t in flat):
            return out
        self._propagate(func, args, kwargs, out)
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        packet = func.overloadpacket
        if packet in _NO_LABEL_OPS:
            return
        if packet in _SHAPE_OPS:
            a0 = args[0]
            lab0 = [self.full(t) for t in a0] if isinstance(a0, (list, tuple)) else self.full(a0)
            rest = [_on_cpu(a) for a in args[1:]]  # labels live on the CPU; index arguments must follow
            try:
                lab = func(lab0, *rest, **{k: _on_cpu(v) for k, v in kwargs.items()})
            except RuntimeError:  # a view the label's strides cannot express: same indices via reshape
                lab = lab0.reshape(out.shape)
            if isinstance(out, (list, tuple)):
                for o, lo in zip(out, lab):
                    self.set(o, lo)
            else:
                self.set(out, lab)
            return
        if packet is aten.copy_:
            self.set(out, torch.broadcast_to(self.full(args[1]), out.shape).clone())
            return
        if packet in _UNARY_OPS or torch.Tag.pointwise in func.tags:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            res = torch.broadcast_to(self.full(tensors[0]), out.shape).contiguous()
            for t in tensors[1:]:
                res = self.link(res, torch.broadcast_to(self.full(t), out.shape).contiguous())
            self.set(out, res)
            return
        if packet in _SAME_SHAPE_REDUCTIONS:
            lab = self.full(args[0])
            dim = args[1] % lab.dim()
            self.set(out, self.reduce(lab, [dim]).expand_as(lab).contiguous())
            return
        if packet in _REDUCTIONS:
            lab = self.full(args[0])
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(lab.dim()))
            dims = [d % lab.dim() for d in ([dims] if isinstance(dims, int) else dims)]
            rep = self.reduce(lab, dims)
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            if isinstance(out, torch.Tensor):
                self.set(out, rep.reshape(out.shape) if keep or rep.numel() == out.numel() else None)
            return
        if packet in _CONTRACTIONS:
            bias, a, b = (args[0], args[1], args[2]) if packet in (aten.baddbmm, aten.addmm) else (None, *args[:2])
            ra = self.reduce(self.full(a), [a.dim() - 1])          # [..., n, 1]
            rb = self.reduce(self.full(b), [b.dim() - 2])          # [..., 1, m]
            res = self.link(ra.expand(out.shape).contiguous(), rb.expand(out.shape).contiguous())
            if bias is not None:
                res = self.link(res, torch.broadcast_to(self.full(bias), out.shape).contiguous())
            self.set(out, res)
            return
        raise RuntimeError(f"structural trace: no channel rule for aten op {func} on channel-labelled inputs; "
                           "add it to sparsefast/prune/structural/trace.py")


@contextmanager
def _all_on_meta(model: nn.Module, enabled: bool):
    """Inside the with-statement every real parameter and buffer of `model` is replaced by a meta tensor of its
    shape (tied tensors stay one); they are put back after it. So a model whose decoder layers are on the meta
    device while its embeddings are real (pruning from disk) traces on meta: only labels matter, never values."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    metas: dict[int, torch.Tensor] = {}
    if enabled:
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or tensor.is_meta:
                        continue
                    if id(tensor) not in metas:
                        meta = torch.empty_like(tensor, device="meta")
                        metas[id(tensor)] = (nn.Parameter(meta, requires_grad=tensor.requires_grad)
                                             if isinstance(tensor, nn.Parameter) else meta)
                    swapped.append((store, name, tensor))
                    store[name] = metas[id(tensor)]
    try:
        yield
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor


def trace_channels(model: nn.Module, nodes: NodeSpace, *, constant_outputs: frozenset[str] = frozenset(),
                   seq_len: int = 3) -> TraceResult:
    """Run one forward of `model` on `seq_len` random token ids with channel labels (eager attention, no cache).

    nodes: filled here on first use (node ids are allocated in `named_modules` order, so two traces of the same
    model share ids). constant_outputs: Linear names whose outputs are treated as constants (no labels); used to
    split a KV group into its query heads. Returns the coupled node pairs and bookkeeping.
    """
    mode = _LabelMode()
    fresh = not nodes.ranges
    handles, node_of, order, linear_inputs = [], {}, {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            spec = {"in": (nodes.add(name, "in", mod.in_features) if fresh else _ids(nodes, name, "in")),
                    "out": (nodes.add(name, "out", mod.out_features) if fresh else _ids(nodes, name, "out"))}
        elif isinstance(mod, nn.Embedding):
            spec = {"out": nodes.add(name, "out", mod.embedding_dim) if fresh else _ids(nodes, name, "out")}
        elif is_norm_module(mod):
            size = next(mod.parameters()).shape[0]
            spec = {"ch": nodes.add(name, "ch", size) if fresh else _ids(nodes, name, "ch")}
        else:
            continue
        node_of[name] = spec
        handles.append(mod.register_forward_pre_hook(_pre_hook(mode, name, spec, order, linear_inputs)))
        handles.append(mod.register_forward_hook(_post_hook(mode, name, spec, constant_outputs)))
    cfg = getattr(model, "config", None)
    saved = getattr(cfg, "_attn_implementation", None)
    try:
        if cfg is not None:
            cfg._attn_implementation = "eager"  # matmul/softmax ops carry labels; fused SDPA kernels would not
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        on_meta = {t.is_meta for t in itertools.chain(model.parameters(), model.buffers())} == {True, False}
        device = torch.device("meta") if on_meta else next(model.parameters()).device
        # on meta, an explicit mask: transformers' mask code would otherwise inspect the position ids' values
        mask = {"attention_mask": torch.ones_like(ids, device=device)} if device.type == "meta" else {}
        with torch.no_grad(), _all_on_meta(model, on_meta), mode:
            logits = model(input_ids=ids.to(device), use_cache=False, **mask).logits
    finally:
        if cfg is not None:
            cfg._attn_implementation = saved
        for h in handles:
            h.remove()
    out_lab = mode.get(logits)
    if out_lab is None:
        raise RuntimeError("structural trace: the logits carry no channel labels; the model's head was not traced")
    packed = torch.cat(mode.edges).unique() if mode.edges else torch.zeros(0, dtype=torch.long)
    edges = torch.stack([packed >> 32, packed & 0xFFFFFFFF], 1).numpy()
    return TraceResult(edges=edges, output_nodes=np.unique(out_lab[out_lab >= 0].numpy()), order=order,
                       linear_inputs=linear_inputs)


def _on_cpu(a):
    if isinstance(a, torch.Tensor):
        return a.cpu()
    if isinstance(a, (list, tuple)):
        return type(a)(_on_cpu(x) for x in a)
    if isinstance(a, torch.device):
        return torch.device("cpu")
    return a


def _ids(nodes: NodeSpace, name: str, role: str) -> torch.Tensor:
    a, b = nodes.ranges[(name, role)]
    return torch.arange(a, b)


def _pre_hook(mode: _LabelMode, name: str, spec: dict, order: dict, linear_inputs: dict):
    def hook(module, args):
        order.setdefault(name, len(order))
        x = args[0] if args else None
        lab = mode.get(x)
        mode.bypass += 1
        if "in" in spec:
            linear_inputs[name] = id(x)
        target = spec.get("in", spec.get("ch"))
        if lab is not None and target is not None and lab.shape[-1] == target.numel():
            mode.link(lab, target.expand_as(lab).contiguous())
    return hook


def _post_hook(mode: _LabelMode, name: str, spec: dict, constant_outputs: frozenset[str]):
    def hook(module, args, out):
        ids = spec.get("out", spec.get("ch"))
        if name not in constant_outputs and isinstance(out, torch.Tensor) and out.shape[-1] == ids.numel():
            mode.set(out, ids.expand(out.shape).contiguous())
        mode.bypass -= 1
    return hook


def connected_components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Component id (its smallest node) of every node; min-label propagation with pointer jumping."""
    lab = np.arange(num_nodes)
    if len(edges) == 0:
        return lab
    a, b = edges[:, 0], edges[:, 1]
    while True:
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        if np.array_equal(new, lab):
            return lab
        lab = new
