"""Save / reload a structurally pruned model without pickle (LLM-Pruner could only torch.save the module, #3/#68).

A checkpoint dir holds the usual transformers files (config.json, model.safetensors, tokenizer files) plus
`structure.json`, which carries what one config cannot: per-layer head counts and MLP widths, the shape of every
Linear / Embedding / norm, and the per-module attributes forward() reads. `load_structural` builds the model from
config.json, shrinks each module to the recorded shape, then loads the safetensors weights (strict: every tensor
must match) and re-ties tied weights. `sparsefast.models.load_model` delegates here when structure.json exists.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefast.checkpoint import REPORT_NAME, atomic_output_dir, check_output_dir
from sparsefast.prune.structural.slicing import HEAD_ATTRS, MLP_ATTRS, replace_parameter, sync_module_shapes
from sparsefast.prune.structural.trace import is_norm_module

STRUCTURE_FILE = "structure.json"
FORMAT = "sparsefast-structural"
VERSION = 1


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


def _resize(model: nn.Module, p: nn.Parameter, shape: list[int]) -> None:
    """Replace `p` by an uninitialised parameter of `shape` in every module holding it (ties survive)."""
    replace_parameter(model, p, torch.empty(shape, dtype=p.dtype, device=p.device))


@torch.no_grad()
def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Shrink the freshly built `model` to `structure` (shapes and attributes); weights are left uninitialised."""
    if structure.get("format") != FORMAT or structure.get("version") != VERSION:
        raise ValueError(f"{STRUCTURE_FILE}: unknown format {structure.get('format')!r} v{structure.get('version')}; "
                         f"expected {FORMAT} v{VERSION}")
    names = dict(model.named_modules())
    for name, spec in structure["modules"].items():
        mod = names.get(name)
        if mod is None:
            raise ValueError(f"{STRUCTURE_FILE}: module {name!r} does not exist in {type(model).__name__}")
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
    for name, attrs in structure.get("attributes", {}).items():
        for attr, value in attrs.items():
            setattr(names[name], attr, int(value))


def save_structural(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
                    layers: list[dict] | None = None, overwrite: bool = False) -> Path:
    """Write `model` (safetensors + config.json + structure.json [+ tokenizer, sparsefast.json]) atomically
    (temporary dir beside `out_dir`, then rename). Raises ValueError for a non-empty `out_dir` without overwrite."""
    out = check_output_dir(out_dir, overwrite)
    structure = structure_of(model, layers if layers is not None else getattr(model, "sparsefast_layers", None))
    with atomic_output_dir(out) as tmp:
        kwargs = {}
        if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
            kwargs["save_original_format"] = False  # tensor names = module names (GPT-NeoX: lm_head, not embed_out)
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str))
    return out


def load_structural(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer or None) from a checkpoint written by `save_structural`; model in eval mode on `device`."""
    import transformers
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / STRUCTURE_FILE).is_file():
        raise FileNotFoundError(f"{root / STRUCTURE_FILE} not found; is {root} a structurally pruned checkpoint?")
    structure = json.loads((root / STRUCTURE_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(model, structure)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{root}: weights do not match {STRUCTURE_FILE}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.sparsefast_layers = structure.get("layers", [])
    tokenizer = None
    if (root / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    return model.to(device).eval(), tokenizer
