"""The one checkpoint writer (dense, mask-pruned and structural checkpoints alike) and its output-safety rules.

A checkpoint is a standard Hugging Face directory (safetensors + config + tokenizer) plus `sparsefast.json` (the
report) and, for structurally pruned models, `structure.json`. Rules, in the order a save applies them:
- Before any work (`check_output_dir`): `out` may not be the current directory or one of its parents, nor a model
  source or a directory containing one; an existing non-empty `out` is replaced only with overwrite, and only when it
  is itself a sparsefast output (it holds sparsefast.json or our structure.json). Never anything else.
- Everything is written into a partial directory beside `out` (`.NAME.partial-*`, mode from the umask), which the
  writer holds a lock on (flock) while it fills it; a partial whose lock is free belongs to a killed run and is
  removed, with a message, by the next save to the same target.
- Publish (`publish_dir`): `os.rename` of the partial directory onto `out`, which succeeds only onto a missing or
  empty directory, so of two writers racing to one new `out` exactly one wins and the other gets FileExistsError.
  An existing output is moved aside only when overwrite is on and it is (still) our own output; publishes into one
  parent directory are serialised by a lock on that directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

REPORT_NAME = "sparsefast.json"
STRUCTURE_FILE = "structure.json"  # marks a structurally pruned checkpoint (sparsefast.models.structural)
STRUCTURE_FORMAT = "sparsefast-structural"
PARTIAL_TAG = ".partial-"


def is_sparsefast_output(path: Path) -> bool:
    """True when directory `path` was written by sparsefast: it holds sparsefast.json or our structure.json."""
    if (path / REPORT_NAME).is_file():
        return True
    try:
        return json.loads((path / STRUCTURE_FILE).read_text()).get("format") == STRUCTURE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, *,
                     sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate `out` before any work; returns the resolved path. Raises ValueError naming the problem and the fix.

    Refused: the current directory or one of its parents; a path that is, or contains, one of `sources` (the model
    being read); a file; a non-empty directory without `overwrite`, or with it unless it is a sparsefast output;
    a location whose nearest existing ancestor is not a writable directory.
    """
    path = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"output {path} is the current directory or one of its parents; a save there would replace "
                         f"your working files: choose a new directory, e.g. --out {cwd / 'pruned'}")
    for source in sources:
        src = Path(source).expanduser().resolve()
        if path == src or path in src.parents:
            how = "is" if path == src else "contains"
            raise ValueError(f"output {path} {how} the model source {src}; the input is never replaced: choose "
                             "another --out")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"output directory {path} exists and is not empty; choose another --out or pass "
                             "--overwrite")
        if not is_sparsefast_output(path):
            raise ValueError(f"output directory {path} is not a sparsefast output (no {REPORT_NAME} or "
                             f"{STRUCTURE_FILE}); --overwrite replaces only an empty directory or a checkpoint "
                             "sparsefast wrote: choose another --out")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write under {parent}; choose a writable --out")
    return path


def check_savable(model: nn.Module) -> None:
    """Raise ValueError before any work when `model` cannot be written as a float checkpoint: it carries a
    quantizer other than GGUF's (GGUF weights are dequantized floats, see `_dequantized_view`) that transformers
    cannot serialize."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or _is_gguf(quantizer):
        return
    if not getattr(quantizer, "is_serializable", lambda *a: True)():
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise ValueError(f"the model is quantized with {getattr(method, 'value', method)}, which transformers cannot "
                         "save; load it unquantized (a float checkpoint) to prune and save it")


def save_checkpoint(model: nn.Module, tokenizer: Any, out: str | os.PathLike, report: dict | None = None, *,
                    overwrite: bool = False, structure: dict | None = None,
                    sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write model (safetensors), config, tokenizer, `report` (sparsefast.json) and, for a structurally pruned
    model, `structure` (structure.json) to `out`, atomically and exclusively (module docstring). Returns the path.

    Zeros stay zeros: weights are saved densely, in the model's dtype. With `structure`, tensors are named after the
    modules (transformers' "original format" renames, e.g. GPT-NeoX's lm_head, would not match the sliced shapes).
    Raises ValueError for a bad `out` (check_output_dir) and FileExistsError when another writer published `out`
    first.
    """
    path = check_output_dir(out, overwrite, sources=sources)
    check_savable(model)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if structure is not None and "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        kwargs["save_original_format"] = False
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with _dequantized_view(model):
            model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if structure is not None:
            (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    return path


@contextlib.contextmanager
def atomic_output_dir(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new, locked partial directory beside `path`; when the block succeeds it is published to `path`
    (publish_dir), when it raises (or is interrupted) it is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_dir(path.parent):
        remove_stale_partials(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL_TAG}", dir=path.parent))
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the end: marks the partial as alive (released if killed)
    try:
        yield tmp
        _follow_umask(tmp)
        publish_dir(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def publish_dir(src: Path, dst: Path, *, overwrite: bool = False) -> None:
    """Rename directory `src` to `dst`. A missing or empty `dst` is taken (os.rename cannot replace a non-empty
    directory); an existing non-empty `dst` is replaced only with `overwrite` and only when it is a sparsefast
    output: it is moved aside, `src` renamed in, then the old one removed. Raises FileExistsError otherwise."""
    with _locked_dir(dst.parent):
        try:
            os.rename(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if not overwrite or not dst.is_dir() or not is_sparsefast_output(dst):
            why = ("it is not a sparsefast output" if overwrite else "no --overwrite")
            raise FileExistsError(f"{dst} appeared while this checkpoint was being written (another writer?) and "
                                  f"was left as it is ({why}); this result was not saved: choose another --out")
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the `.NAME.partial-*` directories of target `path` whose writer is gone (their lock is free: the run
    was killed before it could clean up), saying so on stderr. Partials still being written are kept."""
    removed = []
    for partial in path.parent.glob(f".{path.name}{PARTIAL_TAG}*"):
        if not partial.is_dir() or partial.is_symlink():
            continue
        fd = os.open(partial, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        else:
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
            print(f"sparsefast: removed {partial}, a partial save of {path.name} left by an interrupted run",
                  file=sys.stderr)
        finally:
            os.close(fd)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Give `root` and everything we wrote under it the modes the umask asks for: mkdtemp makes 0700 and some
    writers (safetensors) make 0600 files, which would hide a checkpoint from the user's group for no reason."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(base, f), 0o666 & ~mask)


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Exclusive flock on `directory` itself (no lock file to leave behind) for the duration of the block."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_gguf(quantizer: Any) -> bool:
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


@contextlib.contextmanager
def _dequantized_view(model: nn.Module) -> Iterator[None]:
    """A model loaded from a .gguf file holds plain dequantized float weights, but transformers keeps its GGUF
    quantizer and refuses to save it. Hide the quantizer (and the config's quantization entry) during the save so a
    normal float checkpoint is written; restore both afterwards. Other quantizers are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not _is_gguf(quantizer):
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


def check_output_file(path: str | os.PathLike) -> Path:
    """A file about to be written: not a directory, in an existing writable directory. Raises ValueError."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give a file name")
    if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise ValueError(f"directory {p.parent} does not exist or is not writable; create it first")
    return p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON atomically (temporary file beside `path`, then os.replace); the file follows the umask."""
    p = check_output_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
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
