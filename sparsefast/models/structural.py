"""The structural checkpoint format: a structurally pruned model saved without pickle (LLM-Pruner could only
torch.save the module, #3/#68), and the module-shape bookkeeping it shares with the structural pruner.

A checkpoint dir holds the usual transformers files (config.json, model.safetensors, tokenizer files) plus
`structure.json`, which carries what one config cannot: per-layer head counts and MLP widths, the shape of every
Linear / Embedding / norm, and the per-module attributes forward() reads. `save_structural` writes it through the one
checkpoint writer (`sparsefast.checkpoint.save_checkpoint`). Reading (`sparsefast.models.loading.load_structural`,
which `load_model` delegates to when structure.json exists) builds the model from config.json, then
`apply_structure` checks the record strictly against it (`check_structure`: known keys, existing modules of the
right kind, shapes that only shrink, only head/MLP size attributes set to positive ints within the config's bounds)
and shrinks each module to the recorded shape.

The shape primitives (`is_norm_module`, `replace_parameter`, `sync_module_shapes`, the head/MLP attribute names) live
here, below both of their users: the reader of this format and sparsefast.prune.structural's slicing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefast.checkpoint import STRUCTURE_FILE, save_checkpoint
from sparsefast.checkpoint import STRUCTURE_FORMAT as FORMAT

# module attributes that attention / MLP forward() read instead of the weight shapes
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups")
MLP_ATTRS = ("intermediate_size", "ffn_dim")

VERSION = 1
REQUIRED_KEYS = ("format", "version", "modules", "attributes")
OPTIONAL_KEYS = ("architecture", "num_hidden_layers", "hidden_size", "layers")


def is_norm_module(module: nn.Module) -> bool:
    """A leaf module (not Linear/Embedding) whose parameters are all 1-D of one size: LayerNorm, RMSNorm, ..."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or next(module.children(), None) is not None:
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() == 1 for p in params) and len({p.shape[0] for p in params}) == 1


def replace_parameter(model: nn.Module, old: nn.Parameter, new: torch.Tensor) -> None:
    """Swap `old` for `new` in every module that holds it (tied weights stay tied)."""
    param = nn.Parameter(new, requires_grad=old.requires_grad)
    for mod in model.modules():
        for key, value in list(mod._parameters.items()):
            if value is old:
                mod._parameters[key] = param


def sync_module_shapes(model: nn.Module) -> None:
    """Make Linear/Embedding/norm attributes agree with their (possibly sliced) weights."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif is_norm_module(mod) and hasattr(mod, "normalized_shape"):
            mod.normalized_shape = (next(mod.parameters()).shape[0],)


def structure_of(model: nn.Module, layers: list[dict] | None = None) -> dict[str, Any]:
    """The structure record of `model`: module shapes, per-module head/MLP attributes, per-layer summary."""
    modules, attributes = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            modules[name] = {"kind": "linear", "shape": list(mod.weight.shape), "bias": mod.bias is not None}
        elif isinstance(mod, nn.Embedding):
            modules[name] = {"kind": "embedding", "shape": list(mod.weight.shape)}
        elif is_norm_module(mod):
            modules[name] = {"kind": "norm", "size": next(mod.parameters()).shape[0]}
        attrs = {a: getattr(mod, a) for a in HEAD_ATTRS + MLP_ATTRS if isinstance(getattr(mod, a, None), int)}
        if attrs and name:
            attributes[name] = attrs
    cfg = getattr(model, "config", None)
    return {"format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "layers": layers or [], "modules": modules, "attributes": attributes}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return "norm" if is_norm_module(mod) else None


def check_structure(model: nn.Module, structure: Any) -> None:
    """Validate a structure record against the freshly built (unpruned-shape) `model` before anything is resized.

    Raises ValueError naming the first offending entry: wrong format/version, unknown or missing keys, a module
    that does not exist or is of another kind, a shape that is not positive ints or exceeds the module's size from
    config.json (pruning only shrinks), an attribute other than the head/MLP size fields, or one that is not a
    positive int within the config's bounds."""
    where = STRUCTURE_FILE
    if not isinstance(structure, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(structure).__name__}")
    if structure.get("format") != FORMAT or structure.get("version") != VERSION:
        raise ValueError(f"{where}: unknown format {structure.get('format')!r} v{structure.get('version')}; "
                         f"expected {FORMAT} v{VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in structure]
    unknown = sorted(set(structure) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    if not isinstance(structure["modules"], dict) or not isinstance(structure["attributes"], dict):
        raise ValueError(f"{where}: 'modules' and 'attributes' must be JSON objects")
    names = dict(model.named_modules())
    arch = type(model).__name__
    for name, spec in structure["modules"].items():
        mod = names.get(name)
        if mod is None:
            raise ValueError(f"{where}: module {name!r} does not exist in {arch}")
        kind = _kind(mod)
        if not isinstance(spec, dict) or spec.get("kind") != kind:
            raise ValueError(f"{where}: module {name!r} is a {kind or 'container'} in {arch}, the entry says "
                             f"{spec.get('kind') if isinstance(spec, dict) else spec!r}")
        if kind == "norm":
            full, wanted = [next(mod.parameters()).shape[0]], [spec.get("size")]
        else:
            full, wanted = list(mod.weight.shape), spec.get("shape")
        if (not isinstance(wanted, list) or len(wanted) != len(full) or not all(map(_positive_int, wanted))
                or any(w > f for w, f in zip(wanted, full))):
            raise ValueError(f"{where}: module {name!r} asks for size {wanted}; only positive ints up to its "
                             f"size {full} from config.json are allowed")
    allowed = HEAD_ATTRS + MLP_ATTRS
    heads = getattr(model.config, "num_attention_heads", None)
    for name, attrs in structure["attributes"].items():
        mod = names.get(name)
        if mod is None or not name:
            raise ValueError(f"{where}: attributes of module {name!r}, which does not exist in {arch}")
        if not isinstance(attrs, dict):
            raise ValueError(f"{where}: attributes of {name!r} must be a JSON object")
        for attr, value in attrs.items():
            if attr not in allowed or not isinstance(getattr(mod, attr, None), int):
                raise ValueError(f"{where}: {name}.{attr} may not be set; only the head/MLP size fields "
                                 f"{', '.join(allowed)} that the module has")
            bound = heads if attr in HEAD_ATTRS and isinstance(heads, int) else getattr(mod, attr)
            if not _positive_int(value) or value > bound:
                raise ValueError(f"{where}: {name}.{attr} = {value!r}; it must be a positive int <= {bound} "
                                 "(the config's size)")


def _resize(model: nn.Module, p: nn.Parameter, shape: list[int]) -> None:
    """Replace `p` by an uninitialised parameter of `shape` in every module holding it (ties survive)."""
    replace_parameter(model, p, torch.empty(shape, dtype=p.dtype, device=p.device))


@torch.no_grad()
def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Shrink the freshly built `model` to `structure` (shapes and attributes, validated by check_structure first);
    weights are left uninitialised."""
    check_structure(model, structure)
    names = dict(model.named_modules())
    for name, spec in structure["modules"].items():
        mod = names[name]
        if spec["kind"] in ("linear", "embedding"):
            if list(mod.weight.shape) != spec["shape"]:
                _resize(model, mod.weight, spec["shape"])
            if spec["kind"] == "linear" and mod.bias is not None and mod.bias.shape[0] != spec["shape"][0]:
                _resize(model, mod.bias, [spec["shape"][0]])
        else:
            for p in list(mod._parameters.values()):
                if p is not None and p.shape[0] != spec["size"]:
                    _resize(model, p, [spec["size"]])
    sync_module_shapes(model)
    for name, attrs in structure["attributes"].items():
        for attr, value in attrs.items():
            setattr(names[name], attr, value)


def save_structural(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
                    layers: list[dict] | None = None, overwrite: bool = False,
                    sources: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write `model` (safetensors + config.json + structure.json [+ tokenizer, sparsefast.json]) through the one
    checkpoint writer (atomic, exclusive; see sparsefast.checkpoint for what `overwrite` may replace). `out_dir`: a
    path, or the sparsefast.checkpoint.OutputClaim the run took before its work (its overwrite and sources apply)."""
    structure = structure_of(model, layers if layers is not None else getattr(model, "sparsefast_layers", None))
    return save_checkpoint(model, tokenizer, out_dir, report, overwrite=overwrite, structure=structure,
                           sources=sources)
