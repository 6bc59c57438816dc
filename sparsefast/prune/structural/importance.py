"""Group importance (LLM-Pruner, Ma et al. 2023, §3.2, eqs. 2–5).

For a unit (a coupled group) with members W_k (weight slices) the first-order Taylor estimate of the loss change
when the unit is removed is built from per-element scores, reduced per member, then aggregated over members:

* random   — uniform noise per unit (a baseline);
* l2       — Σ W² over the member's slice (magnitude);
* vector   — Σ_channels |Σ_elements W·g|          (vector-wise Taylor, eq. 3 on whole channels);
* element1 — Σ |W·g|                               (element-wise, first order);
* element2 — Σ |½ W²·F|, F = Σ_n g_n²              (element-wise second order; diagonal Fisher from per-sample
  squared gradients stands in for the Hessian, eq. 5);
* mix      — Σ |W·g − ½ W²·F|                      (first + second order).

g = Σ_n ∂L_n/∂W over calibration samples n (per-sample backward = gradient accumulation, one sample in memory at a
time; decoder layers run under activation checkpointing). Only parameters of candidate units get gradients, so
peak memory is the model + gradients of the pruned layers + (element2/mix) one fp32 Fisher buffer for them.

Aggregation over members: sum | mean | max | prod (as Σ log, the same order without underflow) | last (the member
whose module runs last, e.g. down_proj columns or o_proj columns).

Order of the reductions for heads (attention and query units, whose members are head_dim-wide slices): as in
LLM-Pruner's TaylorImportance + MetaPruner, the members are combined channel by channel first and the result is
summed over the head's channels: score = Σ_c agg_m s_m[c], where s_m[c] is member m's per-channel score (a member
spanning several heads, e.g. a KV group's q rows, is first folded onto head_dim by summing its heads, as LLM-Pruner
folds a longer member onto the shortest). For sum, mean and last the order changes nothing; for max and prod it
does (max_m Σ_c ≠ Σ_c max_m). prod is kept in log form: log Σ_c Π_m s_m[c] = logsumexp_c Σ_m log s_m[c]. MLP and
hidden units have one channel per member, so the two orders coincide; a layer unit combines whole-member sums.

GQA, where sparsefast differs from LLM-Pruner on purpose: a KV group g (gqa="kv_groups") is scored from the query
heads that read it and are removed with it, heads g·n_rep … g·n_rep + n_rep − 1 (n_rep = query heads per KV
head, HF's repeat_kv layout), plus K/V head g and the matching o_proj columns. LLM-Pruner's Llama-3 path
(llama3.py, TaylorImportance's fold `imp.view(len // min, min).sum(0)`) instead scores KV group g from query heads
{g, g + KV, g + 2·KV, …} but then removes heads g·n_rep … g·n_rep + n_rep − 1, so on GQA models its scores and
its removals belong to different heads. On MHA (n_rep = 1) both are the same.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsefast.config.structural import StructuralConfig
from sparsefast.models.layer_inputs import call_layer, capture_layer_inputs
from sparsefast.prune.structural.graph import Member, Unit, decoder_layers


@contextmanager
def _checkpointed(layers: nn.ModuleList, enabled: bool):
    """Run every decoder layer under non-reentrant activation checkpointing (eval mode: no dropout)."""
    originals = []
    if enabled:
        for layer in layers:
            fwd = layer.forward

            def wrapped(*args, _fwd=fwd, **kwargs):
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

            originals.append((layer, fwd))
            layer.forward = wrapped
    try:
        yield
    finally:
        for layer, _ in originals:
            del layer.forward


def check_calibration_ids(calib: torch.Tensor) -> None:
    """Raise ValueError unless `calib` is a LongTensor [nsamples, seqlen] of token ids."""
    if calib.dim() != 2 or calib.dtype != torch.long:
        raise ValueError(f"calibration ids must be a LongTensor [nsamples, seqlen], got {calib.dtype} "
                         f"{tuple(calib.shape)}")


def accumulate_gradients(model: nn.Module, params: dict[str, nn.Parameter], calib: torch.Tensor, *,
                         fisher: bool, layers: nn.ModuleList | None = None,
                         checkpointing: bool = True) -> tuple[dict, dict, dict]:
    """Σ_n g_n and (fisher=True) Σ_n g_n² for `params` over the rows of `calib` [nsamples, seqlen] (int64).

    Returns (grad, fisher, stats) with fp32 tensors on the parameters' devices; stats: loss, peak memory, time.
    Other parameters get no gradients; requires_grad flags are restored afterwards.
    """
    check_calibration_ids(calib)
    saved = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    device = next(iter(params.values())).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    grad = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    fish = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()} if fisher else {}
    losses, t0 = [], time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _checkpointed(layers if layers is not None else nn.ModuleList(), checkpointing):
            for row in calib:
                ids = row[None].to(next(model.parameters()).device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise RuntimeError(f"calibration loss is {loss.item()}; use float32 or bfloat16 weights")
                loss.backward()
                losses.append(loss.detach().item())
                for n, p in params.items():
                    if p.grad is None:
                        continue
                    g = p.grad.float()
                    grad[n] += g
                    if fisher:
                        fish[n].addcmul_(g, g)
                    p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        model.train(was_training)
    stats = {"calib_loss": sum(losses) / len(losses), "grad_seconds": time.perf_counter() - t0,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        stats["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return grad, fish, stats


def channel_scores(weight: torch.Tensor, dim: int, kind: str, grad: torch.Tensor | None = None,
                   fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel score along `dim` of one parameter (fp32 [weight.shape[dim]]), before aggregation.

    kind: l2 | vector | element1 | element2 | mix (see the module docstring).
    """
    w = weight.detach().float()
    if kind == "l2":
        s = w * w
    elif kind == "vector":
        wg = (w * grad).movedim(dim, 0).reshape(w.shape[dim], -1)
        return wg.sum(1).abs()
    elif kind == "element1":
        s = (w * grad).abs()
    elif kind == "element2":
        s = (0.5 * w * w * fisher).abs()
    elif kind == "mix":
        s = (w * grad - 0.5 * w * w * fisher).abs()
    else:
        raise ValueError(f"unknown importance {kind!r}")
    return s.movedim(dim, 0).reshape(w.shape[dim], -1).sum(1)


def aggregate(scores: list[float], members: list[Member], how: str) -> float:
    """Combine member scores of one unit: sum | mean | max | prod (Σ log) | last (latest-executed member)."""
    if how == "sum":
        return float(sum(scores))
    if how == "mean":
        return float(sum(scores) / len(scores))
    if how == "max":
        return float(max(scores))
    if how == "prod":
        return float(sum(math.log(s) if s > 0 else -math.inf for s in scores))
    if how == "last":
        last = max(range(len(members)), key=lambda i: (members[i].order, members[i].dim == 1))
        return float(scores[last])
    raise ValueError(f"unknown aggregation {how!r}")


def aggregate_head(channel_scores_per_member: list[torch.Tensor], members: list[Member], how: str) -> float:
    """One head unit's score from per-channel member scores (1-D fp64 tensors, each a multiple of head_dim long):
    fold each onto the shortest length by summing its head_dim blocks, combine members per channel with `how`,
    then sum over channels (LLM-Pruner's order; see the module docstring). prod is returned as a log."""
    width = min(v.numel() for v in channel_scores_per_member)
    if any(v.numel() % width for v in channel_scores_per_member):
        raise ValueError(f"head unit members of {[v.numel() for v in channel_scores_per_member]} channels cannot be "
                         f"aligned on {width} channels per head")
    per_channel = torch.stack([v.reshape(-1, width).sum(0) for v in channel_scores_per_member])   # [members, width]
    if how == "sum":
        return float(per_channel.sum())
    if how == "mean":
        return float(per_channel.mean(0).sum())
    if how == "max":
        return float(per_channel.max(0).values.sum())
    if how == "prod":
        return float(torch.logsumexp(per_channel.log().sum(0), 0))
    if how == "last":
        last = max(range(len(members)), key=lambda i: (members[i].order, members[i].dim == 1))
        return float(per_channel[last].sum())
    raise ValueError(f"unknown aggregation {how!r}")


def unit_scores(units: list[Unit], cache: dict[tuple[str, int], torch.Tensor], how: str) -> list[float]:
    """Every unit's score from the per-channel scores of its members' (param, dim) keys (`channel_scores`, fp64)."""
    scores = []
    for u in units:
        if u.kind in ("attention", "query"):
            channels = [cache[(m.param, m.dim)][m.index] for m in u.members]
            scores.append(aggregate_head(channels, u.members, how))
        else:
            member_scores = [float(cache[(m.param, m.dim)][m.index].sum()) for m in u.members]
            scores.append(aggregate(member_scores, u.members, how))
    return scores


def unit_importance(model: nn.Module, units: list[Unit], config: StructuralConfig,
                    calib: torch.Tensor | None, layers: nn.ModuleList | None = None, *,
                    layer_stream=None) -> tuple[list[float], dict]:
    """Importance of every unit (higher = keep). Returns (scores aligned with `units`, stats).

    layer_stream (sparsefast.models.streamed.LayerStream): the decoder layers are on disk; the channel scores come
    from `streamed_channel_scores`, the same numbers with one decoder layer in memory at a time."""
    if config.importance == "random":
        gen = torch.Generator().manual_seed(config.seed)
        return torch.rand(len(units), generator=gen, dtype=torch.float64).tolist(), {}
    if config.needs_gradients and calib is None:
        raise ValueError(f"importance {config.importance!r} needs calibration samples; pass calib or use l2/random")
    keys = sorted({(m.param, m.dim) for u in units for m in u.members})
    if layer_stream is not None:
        cache, stats = streamed_channel_scores(model, keys, config, calib, layer_stream)
        return unit_scores(units, cache, config.aggregation), stats
    params = dict(model.named_parameters())
    used = sorted({name for name, _ in keys})
    stats: dict = {}
    grad, fish = {}, {}
    if config.needs_gradients:
        grad, fish, stats = accumulate_gradients(model, {n: params[n] for n in used}, calib,
                                                 fisher=config.importance in ("element2", "mix"), layers=layers,
                                                 checkpointing=config.gradient_checkpointing)
    cache = {(name, dim): channel_scores(params[name], dim, config.importance, grad.get(name), fish.get(name))
             .double().cpu() for name, dim in keys}
    del grad, fish
    return unit_scores(units, cache, config.aggregation), stats


def streamed_channel_scores(model: nn.Module, keys: list[tuple[str, int]], config: StructuralConfig,
                            calib: torch.Tensor | None, stream) -> tuple[dict, dict]:
    """`channel_scores` of every (param, dim) in `keys`, all inside decoder layers, with the layers on disk: read
    one at a time through `stream` (load / release, writing nothing).

    l2 reads each layer once. The gradients are `accumulate_gradients`' numbers, bit for bit, computed layer by
    layer: a forward pass stores every calibration sample's input of each layer from the lowest one with a
    candidate up; the model's own forward, with its decoder layers standing in for the stored last output, gives
    the loss and its gradient at that output; then from the last layer down each layer is read again, its forward
    recomputed per sample from the stored input and backpropagated from the gradient at its output, which leaves
    the gradients of its parameters (summed, and their squares for the Fisher, per sample in order as the whole
    model's backward does) and the gradient at its input for the layer below. Memory: one decoder layer, the sums of
    its gradients (each sample's gradient of a parameter is added and freed as soon as the backward produces it),
    the stored inputs (samples x seqlen x hidden per layer), each sample's layer arguments (rotary tables, mask) and
    its gradient at the current layer boundary."""
    prefix, layers = decoder_layers(model)
    by_layer: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for name, dim in keys:
        head, _, rest = name.partition(f"{prefix}.")
        index = rest.split(".", 1)[0]
        if head or not index.isdigit():
            raise ValueError(f"{name} is outside the decoder layers: only the block strategy prunes from disk; "
                             "use --from-disk off")
        by_layer[int(index)].append((name, dim))

    def layer_params(i: int) -> dict[str, nn.Parameter]:
        return dict(layers[i].named_parameters(prefix=f"{prefix}.{i}"))

    cache: dict[tuple[str, int], torch.Tensor] = {}
    if not config.needs_gradients:
        for i in sorted(by_layer):
            try:
                stream.load(i, layers[i])
                params = layer_params(i)
                for name, dim in by_layer[i]:
                    cache[(name, dim)] = channel_scores(params[name], dim, config.importance).double().cpu()
            finally:
                stream.release(i, layers[i], write=False)
        return cache, {}
    check_calibration_ids(calib)
    fisher = config.importance in ("element2", "mix")
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    inside = {id(p) for p in layers.parameters()}  # replaced at every load: only the resident ones keep their flags
    resident = [(p, p.requires_grad) for p in model.parameters() if id(p) not in inside]
    lowest = min(by_layer)
    was_training = model.training
    model.eval()
    try:
        for p, _ in resident:  # the resident modules (embeddings, norm, head) take no gradients
            p.requires_grad_(False)
        records = capture_layer_inputs(model, layers, calib, device=cpu, batch_size=1, offload=False)
        kwargs = [kw for _, kw in records]
        hidden = [h for h, _ in records]
        del records
        inputs: dict[int, list[torch.Tensor]] = {}
        returns_tuple = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                hooks = []
                try:
                    stream.load(i, layer)
                    if i == len(layers) - 1:  # what the last layer returns, for its stand-in in _output_gradients
                        hooks.append(layer.register_forward_hook(
                            lambda m, a, out: returns_tuple.append(isinstance(out, tuple))))
                    if i >= lowest:
                        inputs[i] = hidden
                    hidden = [call_layer(layer, h, kw, cpu) for h, kw in zip(hidden, kwargs)]
                finally:
                    for hook in hooks:
                        hook.remove()
                    stream.release(i, layer, write=False)
        grad_out, losses = _output_gradients(model, layers, calib, hidden, returns_tuple[0])
        del hidden
        for i in range(len(layers) - 1, lowest - 1, -1):
            layer = layers[i]
            hooks = []
            try:
                stream.load(i, layer)
                params = layer_params(i)
                wanted = {name for name, _ in by_layer.get(i, [])}
                for name, p in params.items():
                    p.requires_grad_(name in wanted)
                grad = {n: torch.zeros(params[n].shape, dtype=torch.float32) for n in sorted(wanted)}
                fish = {n: torch.zeros(params[n].shape, dtype=torch.float32) for n in sorted(wanted)} if fisher else {}
                hooks = [params[n].register_post_accumulate_grad_hook(
                    functools.partial(_add_gradient, grad=grad[n], fisher=fish.get(n))) for n in grad]
                for s, kw in enumerate(kwargs):
                    x = inputs[i][s].detach().requires_grad_(i > lowest)
                    with torch.enable_grad():
                        torch.autograd.backward(call_layer(layer, x, kw, cpu), grad_out[s])
                    grad_out[s] = x.grad
                del inputs[i]
                for name, dim in by_layer.get(i, []):
                    cache[(name, dim)] = channel_scores(params[name], dim, config.importance, grad[name],
                                                        fish.get(name)).double().cpu()
                del grad, fish
            finally:
                for hook in hooks:
                    hook.remove()
                for p in layer.parameters():
                    p.requires_grad_(False)
                    p.grad = None
                stream.release(i, layer, write=False)
    finally:
        for p, flag in resident:
            p.requires_grad_(flag)
        model.train(was_training)
    stats = {"calib_loss": sum(losses) / len(losses), "grad_seconds": time.perf_counter() - t0,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return cache, stats


def _add_gradient(param: nn.Parameter, *, grad: torch.Tensor, fisher: torch.Tensor | None) -> None:
    """A post-accumulate-grad hook: add the parameter's gradient of one sample to `grad` (and its square to
    `fisher`) as soon as the backward has it, and free it, so one parameter's gradient is in memory at a time."""
    g = param.grad.float()
    grad += g
    if fisher is not None:
        fisher.addcmul_(g, g)
    param.grad = None


def _output_gradients(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, last: list[torch.Tensor],
                      returns_tuple: bool) -> tuple[list[torch.Tensor], list[float]]:
    """Per calibration sample, the loss and its gradient at the last decoder layer's output `last[s]`, from the
    model's own forward (embeddings, norm, head, loss: whatever it computes after its layers) with every decoder
    layer standing in: each passes its input through, the last returns `last[s]`."""
    current: list[torch.Tensor] = []

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if returns_tuple else hidden_states

    def last_output(hidden_states, *args, **kwargs):
        return (current[0],) if returns_tuple else current[0]

    own = [layer.__dict__.get("forward") for layer in layers]  # a forward already set on an instance comes back
    for layer in layers:
        layer.forward = passthrough
    layers[-1].forward = last_output
    grads, losses = [], []
    try:
        for s, row in enumerate(calib):
            current[:] = [last[s].detach().requires_grad_()]
            ids = row[None]
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"calibration loss is {loss.item()}; use float32 or bfloat16 weights")
            loss.backward()
            losses.append(loss.detach().item())
            grads.append(current[0].grad)
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return grads, losses
