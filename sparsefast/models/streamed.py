"""A model whose decoder layers stay on disk until the layer-sequential pass needs them: pruning from disk.

`open_streamed(directory, dtype)` builds the model's modules without weights (parameters on the meta device,
buffers such as rotary tables real), loads everything outside the decoder layers (embeddings, final norm, LM head)
from the checkpoint once, and returns it with a `LayerStream`. The engine (sparsefast.calibrate.prune_layerwise and
layer_outlier_ratios) calls `stream.load(i, layer)` before it touches decoder layer i and `stream.release(i, layer)`
after: `load` reads the layer's tensors from the safetensors files (positioned reads, no mmap:
sparsefast.models.safetensors_stream) and checks its prunable weights are finite, `release` writes the pruned
tensors to the output checkpoint (when the stream has a writer) and returns the layer to the meta device. Peak memory
is then about the resident modules, one decoder layer and the calibration activations, whatever the model size.

Only checkpoints whose safetensors names are the model's own parameter names are streamed (a key transformers would
rename at load, a quantization scale, a missing tensor: refused, with the fix: load it fully). Weights are cast to
the model dtype as `from_pretrained` casts them, so the streamed result is the fully-loaded one, bit for bit
(tests/models/test_streamed.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from torch import nn

from sparsefast.device import return_freed_memory
from sparsefast.models.base import get_adapter
from sparsefast.models.safetensors_stream import CheckpointReader, CheckpointWriter, TensorSpec
from sparsefast.models.weights import check_finite_layer


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """{state-dict name: every name of the same tensor} (tied weights share one Parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _assign(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Make every name in `names` (aliases of one tensor) hold `value`: one Parameter (or buffer) shared by all."""
    first, *_ = names
    module_path, _, leaf = first.rpartition(".")
    is_param = leaf in model.get_submodule(module_path)._parameters
    new = nn.Parameter(value, requires_grad=False) if is_param else value
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        if is_param:
            module._parameters[leaf] = new
        else:
            module._buffers[leaf] = new


class LayerStream:
    """Decoder layers read from `reader` when the engine enters them, written to `writer` (if any) and dropped when
    it leaves them. `layer_prefix` is the adapter's layers path ("model.layers")."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, writer: CheckpointWriter | None = None):
        self.model = model
        self.reader = reader
        self.writer = writer
        self.adapter = get_adapter(model)
        self.layer_prefix = self.adapter.layers_path
        self.loaded_bytes = 0

    def _names(self, i: int, layer: nn.Module) -> dict[str, str]:
        """{name inside the layer: checkpoint name} of the layer's parameters and persistent buffers."""
        return {n: f"{self.layer_prefix}.{i}.{n}" for n in layer.state_dict(keep_vars=True)}

    def load(self, i: int, layer: nn.Module) -> None:
        state = layer.state_dict(keep_vars=True)
        for inner, full in self._names(i, layer).items():
            current = state[inner]
            value = self.reader.read(full)
            value = value.to(current.dtype) if value.is_floating_point() else value
            _assign(layer, [inner], value)
            self.loaded_bytes += value.numel() * value.element_size()
        check_finite_layer(self.adapter, i, layer)

    def release(self, i: int, layer: nn.Module, *, write: bool = True) -> None:
        if write and self.writer is not None:
            state = layer.state_dict(keep_vars=True)
            for inner, full in self._names(i, layer).items():
                self.writer.write(full, state[inner].detach())
        layer.to("meta")
        return_freed_memory()  # else the freed layers' heap blocks stay resident and the peak creeps up per layer


def streamable_dir(name_or_path: str) -> Path | None:
    """The checkpoint directory of `name_or_path` when it can be pruned from disk (a local Hugging Face directory
    with safetensors weights and no structure.json), else None."""
    from sparsefast.models.loading import resolve_model_source
    from sparsefast.models.safetensors_stream import checkpoint_files

    kind, location, _ = resolve_model_source(name_or_path)
    if kind != "hf_dir":
        return None
    try:
        checkpoint_files(location)
    except FileNotFoundError:
        return None
    return Path(location)


def checkpoint_bytes(directory: str | os.PathLike, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's float tensors take in `dtype` (its other tensors as stored): the model's memory."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for stored in CheckpointReader(directory).tensors.values():
        n = stored.spec.nbytes
        total += n // stored.spec.dtype.itemsize * size if stored.spec.dtype.is_floating_point else n
    return total


def open_streamed(directory: str | os.PathLike, dtype: torch.dtype | None = None
                  ) -> tuple[transformers.PreTrainedModel, LayerStream, list[TensorSpec]]:
    """(model with empty decoder layers and its resident modules loaded, its LayerStream without a writer, the
    TensorSpecs of the checkpoint a save would write, in the source's order; a tied tensor under the name
    save_pretrained keeps). Raises ValueError, before reading any weight, when the checkpoint's tensor names or
    shapes are not the model's (see the module docstring)."""
    from accelerate import init_empty_weights

    from sparsefast.models.loading import DTYPE_KWARG, default_load_dtype, load_config

    directory = Path(directory)
    config = load_config(str(directory))
    dtype = dtype or default_load_dtype(config, torch.device("cpu"))
    reader = CheckpointReader(directory)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False, **{DTYPE_KWARG: dtype})
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights as separate meta tensors
    model.eval()
    if model.can_generate():  # as from_pretrained: generation_config.json, else the generation keys of config.json
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(directory), _from_auto=True, local_files_only=True)
        except OSError:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(directory), config_file_name="config.json", _from_auto=True, _from_model_config=True,
                local_files_only=True)
    groups = {tuple(names) for names in _aliases(model).values()}
    stored = set(reader.tensors)
    extra = sorted(stored.difference(*groups))
    missing = sorted(names[0] for names in groups if not stored.intersection(names))
    if extra or missing:
        what = (f"holds {len(extra)} tensors the model does not name (e.g. {extra[0]})" if extra
                else f"lacks {len(missing)} tensors (e.g. {missing[0]})")
        raise ValueError(f"{directory}: the checkpoint {what}, so it cannot be pruned from disk; load it fully "
                         "(--from-disk off)")
    in_layers = f"{get_adapter(model).layers_path}."
    tied_targets = set(getattr(model, "_tied_weights_keys", None) or ())  # the names save_pretrained drops
    state = model.state_dict(keep_vars=True)
    specs = []
    position = {n: i for i, n in enumerate(reader.tensors)}
    for names in sorted(groups, key=lambda g: min(position.get(n, len(position)) for n in g)):
        source = next(n for n in names if n in stored)
        kept = [n for n in sorted(names) if n not in tied_targets] or sorted(names)
        target = state[source]
        if tuple(target.shape) != reader.tensors[source].spec.shape:
            raise ValueError(f"{directory}: {source} has shape {reader.tensors[source].spec.shape}, the config says "
                             f"{tuple(target.shape)}; the checkpoint does not match its config.json")
        specs.append(TensorSpec(kept[0], target.dtype, tuple(target.shape)))
        if not source.startswith(in_layers):
            value = reader.read(source)
            _assign(model, list(names), value.to(target.dtype) if value.is_floating_point() else value)
    return model, LayerStream(model, reader), specs


def save_config(model: transformers.PreTrainedModel, directory: str | os.PathLike) -> None:
    """config.json and generation_config.json as `model.save_pretrained` writes them (it records the dtype and the
    architecture in the config first); the weights are written by the stream."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
