"""Running a model's decoder layers one at a time on recorded inputs: the capture of what enters decoder layer 0
(`capture_layer_inputs`, one record of hidden states and keyword arguments per calibration batch) and the call of one
layer on such a record (`call_layer`). The layer-sequential engine (sparsefast.calibrate), the layer-by-layer
gradients of structural pruning from disk (sparsefast.prune.structural.importance) and the benchmarks use them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the layer-0 hook once its inputs are recorded."""


def _to(obj: Any, device: torch.device | str) -> Any:
    """Move the tensors of a (nested) tuple/list/dict to `device`; leave other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def check_finite_activations(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"calibration activations {where} hold NaN or inf; check the model's dtype (float16 "
                         "overflows are common: try --dtype float32 or bfloat16) and the calibration data")


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer that is not inside a decoder layer to `device`; return a function that
    moves them back to where each one was."""
    inside = {id(m) for m in layers.modules()}
    undo: list[Callable[[], None]] = []
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.device != device:
                old = param.data
                param.data = old.to(device)
                undo.append(lambda p=param, o=old: setattr(p, "data", o))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
                undo.append(lambda m=module, n=name, b=buf: m._buffers.__setitem__(n, b))

    def restore() -> None:
        for fn in reversed(undo):
            fn()
    return restore


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, *, device: torch.device,
                         batch_size: int, offload: bool) -> list[tuple[torch.Tensor, dict]]:
    """Run the model on calib [n, seqlen] (LongTensor) up to decoder layer 0, per batch of `batch_size` rows.

    Returns one (hidden [b, seqlen, hidden], kwargs) pair per batch; stored on CPU when `offload`.
    """
    store = torch.device("cpu") if offload else device
    records: list[tuple[torch.Tensor, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.update({f"__arg{i}": a for i, a in enumerate(args[1:])})
        check_finite_activations(hidden, "entering decoder layer 0")
        records.append((hidden.detach().to(store), _to(kwargs, store)))
        raise _StopForward

    restore = _move_outside_layers(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b0 in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[b0:b0 + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward never reached decoder layer 0; the adapter's "
                                   "decoder_layers() does not match the modules the model runs")
    finally:
        handle.remove()
        restore()
    return records


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    """Decoder `layer`'s output hidden states for one record of capture_layer_inputs (its kwargs moved to
    `device`)."""
    kwargs = _to(kwargs, device)
    args = [kwargs.pop(f"__arg{i}") for i in range(len([k for k in kwargs if k.startswith("__arg")]))]
    out = layer(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
