"""A model whose decoder layers stay on disk until the layer-sequential pass needs them: pruning from disk.

`plan_streamed(directory, dtype)` builds the model's modules without weights (parameters on the meta device, buffers
such as rotary tables real) and checks, from the safetensors headers alone, that the checkpoint can be streamed: its
tensor names and shapes are the model's (a key transformers renames or drops at load other than the ones it ignores
itself, an int8 `weight_scale`, a missing tensor: refused, with the fix). `check_finite_on_disk` reads every
prunable weight once, one at a time, before any output exists. `open_streamed` then loads everything outside the
decoder layers (embeddings, final norm, LM head) and returns a `LayerStream`; its users (the engine's
sparsefast.calibrate.prune_layerwise and layer_outlier_ratios; structural pruning's importance and slicing passes in
sparsefast.prune.structural) call `stream.load(i, layer)` before they touch decoder layer i and
`stream.release(i, layer)` after: `load` reads the layer's tensors (plain reads, no mmap:
sparsefast.models.safetensors_stream), `release` writes the pruned tensors to the output checkpoint (when the stream
has a writer), returns the layer to the meta device and hands the freed heap back to the OS. Peak memory is then the
resident modules, one decoder layer and the calibration activations, whatever the model size.

Weights are cast to the model dtype as `from_pretrained` casts them, tied weights are saved under the name
save_pretrained keeps and the shards are split as it splits them, so the streamed checkpoint is the fully-loaded
one, byte for byte (tests/cli/test_prune_from_disk.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from sparsefast.device import return_freed_memory
from sparsefast.models.base import get_adapter
from sparsefast.models.loading import (
    DTYPE_KWARG,
    INT8_SCALE_SUFFIX,
    default_load_dtype,
    load_config,
    resolve_model_source,
)
from sparsefast.models.safetensors_stream import CheckpointReader, CheckpointWriter, TensorSpec, checkpoint_files
from sparsefast.models.weights import nonfinite_weight
from sparsefast.ops.wanda_mask import all_finite


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """{state-dict name: every name of the same tensor} (tied weights share one Parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _assign(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Make every name in `names` (aliases of one tensor) hold `value`: one Parameter (or buffer) shared by all."""
    module_path, _, leaf = names[0].rpartition(".")
    is_param = leaf in model.get_submodule(module_path)._parameters
    new = nn.Parameter(value, requires_grad=False) if is_param else value
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        if is_param:
            module._parameters[leaf] = new
        else:
            module._buffers[leaf] = new


def _saved_names(model: transformers.PreTrainedModel) -> set[str]:
    """The state-dict names save_pretrained writes (one name per tied tensor: transformers' own choice)."""
    from transformers import modeling_utils

    remove_tied = getattr(modeling_utils, "remove_tied_weights_from_state_dict", None)
    state = model.state_dict(keep_vars=True)
    if remove_tied is not None:
        return set(remove_tied(dict(state), model))
    targets = set(getattr(model, "_tied_weights_keys", None) or ())  # transformers < 5: the names it drops
    groups = {tuple(names) for names in _aliases(model).values()}
    return {([n for n in sorted(g) if n not in targets] or sorted(g))[0] for g in groups}


@dataclass
class StreamPlan:
    """What `plan_streamed` found: the empty model, the checkpoint's reader, the tensors the output will hold (the
    model's state-dict order, save_pretrained's names) and, for each, where it is read from."""
    directory: Path
    model: transformers.PreTrainedModel
    reader: CheckpointReader
    specs: list[TensorSpec]
    sources: dict[str, str]  # output name -> checkpoint name (they differ only for tied tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def layers_prefix(self) -> str:
        return f"{get_adapter(self.model).layers_path}."


def streamable_dir(name_or_path: str) -> tuple[Path | None, str | None]:
    """(the checkpoint directory, None) when `name_or_path` is a local Hugging Face directory with safetensors
    weights, else (None, why not, with the fix)."""
    kind, location, _ = resolve_model_source(name_or_path)
    why = {"gguf": "a GGUF file is dequantized by transformers as a whole; prune it with --from-disk off",
           "structural": "a structurally pruned checkpoint has layers of different widths; prune it with "
                         "--from-disk off",
           "hub": "a hub id: download it first (huggingface-cli download ID --local-dir DIR) and pass DIR"}.get(kind)
    if why is not None:
        return None, why
    try:
        checkpoint_files(location)
    except FileNotFoundError:
        return None, "it has no safetensors weights (model.safetensors or an index); convert it, or --from-disk off"
    return Path(location), None


def plan_streamed(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> StreamPlan:
    """The StreamPlan of a local safetensors checkpoint, from its config and headers only (no weight is read).
    Raises ValueError naming why it cannot be streamed and the fix (module docstring)."""
    from accelerate import init_empty_weights

    directory = Path(directory)
    config = load_config(str(directory))
    dtype = dtype or default_load_dtype(config, torch.device("cpu"))
    reader = CheckpointReader(directory)
    scales = sorted(n for n in reader.tensors if n.endswith(INT8_SCALE_SUFFIX))
    if scales or getattr(config, "quantization_config", None):
        raise ValueError(f"{directory}: prune needs a float model, but this checkpoint is quantized "
                         f"({scales[0] if scales else 'quantization_config'}); prune the checkpoint from before "
                         "quantization, then quantize")
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False, **{DTYPE_KWARG: dtype})
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights as separate meta tensors
    model.eval()
    aliases = _aliases(model)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    stored = {n for n in reader.tensors if not any(p.search(n) for p in ignored)}
    extra = sorted(stored - set(aliases))
    missing = sorted(names[0] for names in aliases.values() if not stored.intersection(names))
    if extra or missing:
        what = (f"holds tensors the model does not name (e.g. {extra[0]}: transformers renames or converts such keys "
                "when it loads them)" if extra else f"lacks {len(missing)} tensors (e.g. {missing[0]})")
        raise ValueError(f"{directory}: the checkpoint {what}, so it cannot be pruned from disk; --from-disk off "
                         "loads it whole")
    state = model.state_dict(keep_vars=True)
    specs, sources = [], {}
    for name in _saved_names(model):
        target = state[name]
        source = next(n for n in aliases[name] if n in stored)
        have = reader.tensors[source].spec
        if tuple(target.shape) != have.shape:
            raise ValueError(f"{directory}: {source} has shape {have.shape}, the config says {tuple(target.shape)}; "
                             "the checkpoint does not match its config.json")
        if not have.dtype.is_floating_point and have.dtype != target.dtype:
            raise ValueError(f"{directory}: {source} is stored as {have.dtype}, the model holds {target.dtype}; "
                             "prune it with --from-disk off")
        specs.append(TensorSpec(name, target.dtype, tuple(target.shape)))
        sources[name] = source
    order = {n: i for i, n in enumerate(state)}
    specs.sort(key=lambda s: order[s.name])  # save_pretrained shards the state dict in its own order
    return StreamPlan(directory, model, reader, specs, sources)


def check_finite_on_disk(plan: StreamPlan, *, progress: bool = True) -> None:
    """Read every prunable weight once (one at a time, cast to the model dtype as loading casts it) and raise
    ValueError naming the first that holds NaN or inf: check_finite_weights for a model still on disk."""
    adapter = get_adapter(plan.model)
    layers = adapter.decoder_layers(plan.model)
    names = [f"{adapter.layers_path}.{i}.{n}" for i, layer in enumerate(layers)
             for n in adapter.prunable_linears(layer)]
    dtypes = {s.name: s.dtype for s in plan.specs}
    for name in tqdm(names, desc="checking weights", disable=not progress, leave=False):
        if not all_finite(plan.reader.read(f"{name}.weight").to(dtypes[f"{name}.weight"])):
            raise nonfinite_weight(name)


class LayerStream:
    """Decoder layers read from the plan's checkpoint when the engine enters them, written to `writer` (if any) and
    dropped when it leaves them."""

    def __init__(self, plan: StreamPlan, writer: CheckpointWriter | None = None):
        self.plan = plan
        self.writer = writer
        self.bytes_read = 0

    def _names(self, i: int, layer: nn.Module) -> dict[str, str]:
        """{name inside the layer: checkpoint name} of the layer's parameters and persistent buffers."""
        return {n: f"{self.plan.layers_prefix}{i}.{n}" for n in layer.state_dict(keep_vars=True)}

    def load(self, i: int, layer: nn.Module) -> None:
        state = layer.state_dict(keep_vars=True)
        for inner, full in self._names(i, layer).items():
            stored = self.plan.reader.tensors[full]
            value = self.plan.reader.read(full)
            _assign(layer, [inner], value.to(state[inner].dtype) if value.is_floating_point() else value)
            self.bytes_read += stored.end - stored.begin
        del state

    def release(self, i: int, layer: nn.Module, *, write: bool = True) -> None:
        if write and self.writer is not None:
            state = layer.state_dict(keep_vars=True)
            for inner, full in self._names(i, layer).items():
                self.writer.write(full, state[inner].detach())
            del state  # no reference may outlive the layer's move to meta
        layer.to("meta")
        return_freed_memory()  # else the freed layers' heap blocks stay resident and the peak creeps up per layer


def open_streamed(plan: StreamPlan) -> LayerStream:
    """Load the plan's tensors outside the decoder layers into its model; return its LayerStream (no writer yet)."""
    aliases = _aliases(plan.model)
    for spec in plan.specs:
        if not spec.name.startswith(plan.layers_prefix):
            value = plan.reader.read(plan.sources[spec.name])
            _assign(plan.model, aliases[spec.name], value.to(spec.dtype) if value.is_floating_point() else value)
    model = plan.model
    if model.can_generate():  # as from_pretrained: generation_config.json, else the generation keys of config.json
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(plan.directory), local_files_only=True)
        except OSError:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(plan.directory), config_file_name="config.json", _from_model_config=True, local_files_only=True)
    return LayerStream(plan)


def save_config(model: transformers.PreTrainedModel, directory: str | os.PathLike) -> None:
    """config.json and generation_config.json as `model.save_pretrained` writes them (it records the dtype and the
    architecture in the config first); the weights are written by the stream."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
