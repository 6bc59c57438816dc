"""The layer-sequential calibration engine (the loop of SparseGPT and Wanda's reference code, made generic).

1. Capture the inputs of decoder layer 0 once: the modules outside the decoder layers (embeddings, rotary tables,
   ...) go to the compute device, a forward pre-hook on layer 0 records its positional input and keyword arguments
   (attention_mask, position_ids, position_embeddings, cache flags: whatever this transformers version passes) and
   raises to stop the forward. One record per calibration batch.
2. For each decoder layer i: move it to the compute device; forward hooks on its prunable linears feed the pruner
   (`add_batch`) over all calibration batches; `prune` each linear; remove hooks; recompute the layer's outputs with
   the pruned weights — they are the inputs of layer i+1 — and move the layer back where it was.
So layer i's statistics come from the outputs of the already pruned layers < i. Only the current layer and the
activations of one batch need to be on the compute device (the others are offloaded to CPU when `offload`).
With a `layer_stream` (sparsefast.models.streamed: pruning from disk) the engine calls `layer_stream.load(i, layer)`
before it touches layer i and `layer_stream.release(i, layer)` after, so only one decoder layer is in memory.

`layer_outlier_ratios` runs the same loop without pruning (each layer's outputs from its dense weights): OWL's
per-layer outlier ratios (sparsefast.prune.owl), which `prune_layerwise` then takes as `layer_sparsity`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsefast.models.layer_inputs import call_layer, capture_layer_inputs, check_finite_activations
from sparsefast.ops.sq_norm import sq_norm_accumulate
from sparsefast.prune.base import Pruner
from sparsefast.prune.owl import outlier_ratio


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prune_layerwise(model: nn.Module, adapter: Any, pruner: Pruner, calib: torch.Tensor | None, *,
                    device: torch.device, batch_size: int = 8, offload: bool = True, progress: bool = True,
                    layer_sparsity: list[float] | None = None, layer_stream: Any = None) -> dict[str, Any]:
    """Prune every decoder layer of `model` in order with `pruner` (and its refiner); modifies the model in place.

    calib: LongTensor [nsamples, seqlen] of token ids (None when neither the pruner nor its refiner needs data).
    layer_sparsity: one unstructured sparsity per decoder layer (OWL) instead of the pruner's single one.
    layer_stream: reads each layer before and writes it after its turn (module docstring); None: all in memory.
    Returns {"linears": {qualified name: stats}, "timings": {...}} with timings in seconds: calib_forward_s
    (forwards through the layers incl. the statistics hooks), stats_s (time inside the hooks), metric_mask_s
    (the pruner's metric, mask and weight update: Wanda's definition of pruning time), per_layer.
    """
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    refiner = pruner.refiner
    needs_data = pruner.needs_calibration or refiner is not None
    if layer_sparsity is not None and len(layer_sparsity) != len(layers):
        raise ValueError(f"layer_sparsity has {len(layer_sparsity)} values for {len(layers)} decoder layers")
    if needs_data and calib is None:
        why = pruner.config.method + (" with refine=dsnot" if not pruner.needs_calibration else "")
        raise ValueError(f"{why} needs calibration data (calib LongTensor [nsamples, seqlen])")
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    t_start = time.perf_counter()
    timings: dict[str, Any] = {"capture_s": 0.0, "calib_forward_s": 0.0, "stats_s": 0.0, "metric_mask_s": 0.0,
                               "per_layer": []}
    linear_stats: dict[str, dict] = {}
    try:
        inputs: list[tuple[torch.Tensor, dict]] = []
        if needs_data:
            t0 = time.perf_counter()
            inputs = capture_layer_inputs(model, layers, calib, device=device, batch_size=batch_size,
                                          offload=offload)
            _sync(device)
            timings["capture_s"] = time.perf_counter() - t0
        for i, layer in enumerate(tqdm(layers, desc=f"{pruner.config.method} layers", disable=not progress)):
            if layer_stream is not None:
                layer_stream.load(i, layer)
            home = next(layer.parameters()).device
            layer.to(device)
            linears = adapter.prunable_linears(layer)
            lt = {"layer": i, "calib_forward_s": 0.0, "stats_s": 0.0, "metric_mask_s": 0.0}
            if layer_sparsity is not None:
                pruner.sparsity = lt["sparsity"] = layer_sparsity[i]
            if refiner is not None:
                refiner.targets = (adapter.attn_in + adapter.attn_out if refiner.scope == "attention"
                                   else tuple(linears))
            observers = [o for o in (pruner if pruner.needs_calibration else None, refiner) if o is not None]
            if needs_data:
                for o in observers:
                    o.start_layer(linears)
                handles = [lin.register_forward_hook(_stats_hook(observers, name, lt, device))
                           for name, lin in linears.items()]
                try:
                    _sync(device)
                    t0 = time.perf_counter()
                    for hidden, kwargs in inputs:
                        call_layer(layer, hidden, kwargs, device)
                    _sync(device)
                    lt["calib_forward_s"] += time.perf_counter() - t0
                finally:
                    for h in handles:
                        h.remove()
            t0 = time.perf_counter()
            pruner.channel_producers = adapter.channel_producers(linears)
            for name, lin in linears.items():
                stats = linear_stats[f"layers.{i}.{name}"] = pruner.prune(name, lin)
                if pruner.config.quantize is not None:
                    stats["quantize"] = pruner.quantize(name, lin)
                if refiner is not None:
                    stats["dsnot_swaps"] = refiner.swapped.pop(name)
            pruner.end_layer()
            if refiner is not None:
                refiner.end_layer()
            _sync(device)
            lt["metric_mask_s"] = time.perf_counter() - t0
            if needs_data and i + 1 < len(layers):
                t0 = time.perf_counter()
                store = torch.device("cpu") if offload else device
                new_inputs = []
                for hidden, kwargs in inputs:
                    out = call_layer(layer, hidden, kwargs, device)
                    check_finite_activations(out, f"leaving decoder layer {i}")
                    new_inputs.append((out.to(store), kwargs))
                inputs = new_inputs
                _sync(device)
                lt["calib_forward_s"] += time.perf_counter() - t0
            layer.to(home)
            if layer_stream is not None:
                layer_stream.release(i, layer)
            for key in ("calib_forward_s", "stats_s", "metric_mask_s"):
                timings[key] += lt[key]
            timings["per_layer"].append(lt)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    timings["calib_forward_s"] += timings["capture_s"]
    timings["total_s"] = time.perf_counter() - t_start
    return {"linears": linear_stats, "timings": timings}


def _stats_hook(observers: list, name: str, lt: dict, device: torch.device) -> Callable:
    """A forward hook feeding the input of linear `name` to every observer's add_batch (pruner, refiner)."""
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        t0 = time.perf_counter()
        for o in observers:
            o.add_batch(name, args[0])
        _sync(device)
        lt["stats_s"] += time.perf_counter() - t0
    return hook


@torch.no_grad()
def layer_outlier_ratios(model: nn.Module, adapter: Any, calib: torch.Tensor, *, m: float, device: torch.device,
                         batch_size: int = 8, offload: bool = True, backend: str = "auto",
                         progress: bool = True, layer_stream: Any = None) -> list[float]:
    """OWL's outlier ratio of every decoder layer (sparsefast.prune.owl.outlier_ratio of the Wanda scores
    |W|·‖X‖₂ of all its prunable linears), the activations coming from the dense model; weights are not changed
    (a `layer_stream` reads each layer and drops it again, writing nothing)."""
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    ratios = []
    try:
        inputs = capture_layer_inputs(model, layers, calib, device=device, batch_size=batch_size, offload=offload)
        store = torch.device("cpu") if offload else device
        for i, layer in enumerate(tqdm(layers, desc="owl outlier ratios", disable=not progress)):
            if layer_stream is not None:
                layer_stream.load(i, layer)
            home = next(layer.parameters()).device
            layer.to(device)
            linears = adapter.prunable_linears(layer)
            acc = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=device)
                   for name, lin in linears.items()}

            def accumulate(name: str) -> Callable:
                def hook(module: nn.Module, args: tuple, output: Any) -> None:  # returns None: output unchanged
                    sq_norm_accumulate(acc[name], args[0].detach(), backend=backend)
                return hook

            handles = [lin.register_forward_hook(accumulate(name)) for name, lin in linears.items()]
            try:
                outputs = [(call_layer(layer, hidden, kwargs, device), kwargs) for hidden, kwargs in inputs]
                ratios.append(outlier_ratio([lin.weight.float().abs() * acc[name].sqrt()[None, :]
                                             for name, lin in linears.items()], m))
            finally:
                for h in handles:
                    h.remove()
                layer.to(home)
                if layer_stream is not None:
                    layer_stream.release(i, layer, write=False)
            for out, _ in outputs:
                check_finite_activations(out, f"leaving decoder layer {i}")
            inputs = [(out.to(store), kwargs) for out, kwargs in outputs]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return ratios
