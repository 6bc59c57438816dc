"""Saving pruned models: a standard Hugging Face checkpoint (safetensors + config + tokenizer) plus sparsefast.json.

Atomic: everything is written into a temporary directory beside `out` and renamed into place at the end, so an
interrupted or failed save never leaves a half-written checkpoint at `out` (an existing `out`, with --overwrite, is
only replaced once the new checkpoint is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

REPORT_NAME = "sparsefast.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate `out` before any work: it must not be a file, nor a non-empty directory unless `overwrite`.

    The nearest existing ancestor must be a writable directory. Returns the resolved path. Raises ValueError.
    """
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output directory {path} exists and is not empty; choose another --out or pass --overwrite")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write under {parent}; choose a writable --out")
    return path


def save_checkpoint(model: nn.Module, tokenizer: Any, out: str | os.PathLike, report: dict | None = None, *,
                    overwrite: bool = False) -> Path:
    """Write model (safetensors), config, tokenizer and `report` (as sparsefast.json) to `out`, atomically.

    Zeros stay zeros: weights are saved densely, in the model's dtype. Returns the final path.
    """
    path = check_output_dir(out, overwrite)
    with atomic_output_dir(path) as tmp:
        with _dequantized_view(model):
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    return path


@contextlib.contextmanager
def atomic_output_dir(path: Path):
    """Yield a new temporary directory beside `path`; when the block succeeds it replaces `path` (replace_dir),
    when it raises (or is interrupted) the temporary directory is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _dequantized_view(model: nn.Module):
    """A model loaded from a .gguf file holds plain dequantized float weights, but transformers keeps its GGUF
    quantizer and refuses to save it. Hide the quantizer (and the config's quantization entry) during the save so a
    normal float checkpoint is written; restore both afterwards. Other quantizers are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        yield
        return
    config = model.config
    had_qc = hasattr(config, "quantization_config")
    qc = getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if had_qc:
        delattr(config, "quantization_config")
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_qc:
            config.quantization_config = qc


def replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst is moved aside first and removed only after the rename succeeded."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | os.PathLike) -> Path:
    """A file about to be written: not a directory, in an existing writable directory. Raises ValueError."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give a file name")
    if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise ValueError(f"directory {p.parent} does not exist or is not writable; create it first")
    return p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON atomically (temporary file beside `path`, then os.replace)."""
    p = check_output_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_report(path: str | os.PathLike) -> dict:
    """Read the sparsefast.json of a saved checkpoint directory."""
    report = Path(path) / REPORT_NAME
    if not report.is_file():
        raise FileNotFoundError(f"{report} not found: {path} is not a checkpoint written by `sparsefast prune`")
    return json.loads(report.read_text())
