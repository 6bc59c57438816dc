"""The one checkpoint writer (dense, mask-pruned and structural checkpoints alike) and its output-safety rules.

A checkpoint is a standard Hugging Face directory (safetensors + config + tokenizer) plus `sparsefast.json` (the
report), for structurally pruned models `structure.json`, and, written last, `sparsefast-output.json`: the record of
the files the save wrote, the only proof that sparsefast owns the directory (sparsefast.ownership). Rules, in the
order a run applies them:
- Before any work (`check_output_dir`): `out` may not be the current directory or one of its parents, nor a model
  source or a directory containing one; an existing non-empty `out` is replaced only with overwrite, and only when
  its record lists everything in it (owned_files). A directory without a record is refused even if it holds a
  sparsefast.json: outputs of earlier versions have none, and a user's report may carry that name.
- The run claims `out` (`OutputClaim`) before its work and holds the claim until the save: an flock on
  `.NAME.lock` beside `out`. A second run on the same `out` stops at once with FileExistsError ("not saved"), so of
  two concurrent runs exactly one writes, whatever --overwrite says.
- Everything is written into a partial directory beside `out` (`.NAME.partial-*`, mode from the umask), which the
  writer holds a lock on (flock) while it fills it; a partial whose lock is free belongs to a killed run and is
  removed, with a message, by the next save to the same target.
- Publish (`publish_dir`): `os.rename` of the partial directory onto `out`, which succeeds only onto a missing or
  empty directory. An existing output is replaced only with overwrite and when it is (still) owned: it is moved
  aside, checked again (a file added meanwhile stays the user's: the old output is put back), the new one renamed
  in, then only the files its record lists are removed.
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

from sparsefast.ownership import RECORD_NAME, make_parents, owned_files, remove_owned, take_lock, write_record

REPORT_NAME = "sparsefast.json"
STRUCTURE_FILE = "structure.json"  # marks a structurally pruned checkpoint (sparsefast.models.structural)
STRUCTURE_FORMAT = "sparsefast-structural"
PARTIAL_TAG = ".partial-"
LOCK_SUFFIX = ".lock"


def check_apart_from_sources(path: Path, sources: Iterable[str | os.PathLike]) -> None:
    """ValueError when the resolved output `path` is one of `sources` (the model being read), contains one, or lies
    inside one: an output never replaces, removes or adds to its input."""
    for source in sources:
        src = Path(source).expanduser().resolve()
        if path == src or path in src.parents or src in path.parents:
            how = "is" if path == src else "contains" if path in src.parents else "is inside"
            raise ValueError(f"output {path} {how} the model source {src}; the input is never changed: choose "
                             "another --out")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, *,
                     sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate `out` before any work; returns the resolved path. Raises ValueError naming the problem and the fix.

    Refused: the current directory or one of its parents; a path that is, contains or lies inside one of `sources`
    (the model being read: check_apart_from_sources); a file; a non-empty directory without `overwrite`, or with it
    unless sparsefast owns it (`_check_owned`); a location whose nearest existing ancestor is not a writable
    directory.
    """
    path = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"output {path} is the current directory or one of its parents; a save there would replace "
                         f"your working files: choose a new directory, e.g. --out {cwd / 'pruned'}")
    check_apart_from_sources(path, sources)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"output directory {path} exists and is not empty; choose another --out or pass "
                             "--overwrite")
        _check_owned(path)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write under {parent}; choose a writable --out")
    return path


def _check_owned(path: Path) -> list[str]:
    """The files sparsefast wrote in the non-empty directory `path` (ownership.owned_files); ValueError when it may
    not be replaced, with the reason and the fix."""
    files = owned_files(path)
    if files is not None:
        return files
    marks = [REPORT_NAME] if (path / REPORT_NAME).exists() else []
    with contextlib.suppress(OSError, ValueError, AttributeError):  # another tool's structure.json is not ours
        if json.loads((path / STRUCTURE_FILE).read_text()).get("format") == STRUCTURE_FORMAT:
            marks.append(STRUCTURE_FILE)
    if marks:
        raise ValueError(f"output directory {path} holds {' and '.join(marks)} but no record of the files sparsefast "
                         "wrote (outputs of earlier sparsefast versions have none, and a report of yours may "
                         "carry that name), so --overwrite cannot tell its files from yours: delete it yourself "
                         "or choose another --out")
    raise ValueError(f"output directory {path} is not a sparsefast output (no {RECORD_NAME}); --overwrite "
                     "replaces only an empty directory or a checkpoint sparsefast wrote: choose another --out")


class OutputClaim(os.PathLike):
    """The right to write output directory `out` for the length of a run, taken before its work: `out` is checked
    (check_output_dir), missing parent directories are made, an flock on `.NAME.lock` beside `out` is taken, and
    `out` is checked again. Raises ValueError (bad `out`) or FileExistsError (another run holds the claim: "not
    saved"). `release()` (or leaving the `with` block) frees the lock, removes the lock file and the parents it made
    if they are still empty. Pass the claim as the `out` of save_checkpoint / save_structural.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, *,
                 sources: Iterable[str | os.PathLike] = ()) -> None:
        sources = tuple(sources)
        self.path = check_output_dir(out, overwrite, sources=sources)
        self.overwrite = overwrite
        self._lock_path = self.path.parent / f".{self.path.name}{LOCK_SUFFIX}"
        self._fd: int | None = None
        self._made = make_parents(self.path.parent)
        try:
            self._fd = take_lock(self._lock_path, self.path)
            check_output_dir(self.path, overwrite, sources=sources)  # a run that finished meanwhile may have saved
        except BaseException:
            self.release()
            raise

    def __fspath__(self) -> str:
        return str(self.path)

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the claim up (idempotent)."""
        if self._fd is not None:
            self._lock_path.unlink(missing_ok=True)  # before the unlock: a waiter re-checks the inode it locked
            os.close(self._fd)
            self._fd = None
        for directory in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: the output was published into it
                directory.rmdir()
        self._made = []


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
    model, `structure` (structure.json) to `out`, atomically and exclusively, with the record of what was written
    last (module docstring). Returns the path.

    `out`: a path (claimed for the length of the save), or the OutputClaim the run took before its work (its own
    overwrite and sources apply). Zeros stay zeros: weights are saved densely, in the model's dtype. With
    `structure`, tensors are named after the modules (transformers' "original format" renames, e.g. GPT-NeoX's
    lm_head, would not match the sliced shapes). Raises ValueError for a bad `out` (check_output_dir) and
    FileExistsError when another run holds `out` or `out` changed so that it may not be replaced ("not saved").
    """
    check_savable(model)
    if not isinstance(out, OutputClaim):
        with OutputClaim(out, overwrite, sources=sources) as claim:
            return save_checkpoint(model, tokenizer, claim, report, structure=structure)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if structure is not None and "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        kwargs["save_original_format"] = False
    with atomic_output_dir(out.path, overwrite=out.overwrite) as tmp:
        with _dequantized_view(model):
            model.save_pretrained(tmp, **kwargs)
        write_beside_weights(tmp, tokenizer, report, structure=structure)
    return out.path


def write_beside_weights(tmp: Path, tokenizer: Any, report: dict | None, *, structure: dict | None = None) -> None:
    """What a checkpoint holds besides the model's weights and config: tokenizer, structure.json, sparsefast.json
    (written into the partial directory of a save; pruning from disk writes the weights itself)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if structure is not None:
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
    if report is not None:
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))


@contextlib.contextmanager
def atomic_output_dir(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new, locked partial directory beside `path` (whose OutputClaim the caller holds); when the block
    succeeds the record of its files is written (ownership.write_record) and it is published to `path`
    (publish_dir), when it raises (or is interrupted) it is removed and `path` is untouched."""
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL_TAG}", dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the end: marks the partial as alive (released if killed)
    try:
        yield tmp
        write_record(tmp)
        _follow_umask(tmp)
        publish_dir(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def publish_dir(src: Path, dst: Path, *, overwrite: bool = False) -> None:
    """Rename directory `src` to `dst` (the caller holds the OutputClaim on `dst`). A missing or empty `dst` is taken
    (os.rename cannot replace a non-empty directory); an existing non-empty `dst` is replaced only with `overwrite`
    and only while sparsefast owns it: it is moved aside, checked again there (a file that appeared meanwhile puts
    it back), `src` is renamed in, then only the old record's files are removed. Raises FileExistsError otherwise:
    `dst` is left as it is and the result is not saved."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if not overwrite or not dst.is_dir() or dst.is_symlink():
        raise FileExistsError(f"{dst} appeared while this checkpoint was being written and was left as it is (no "
                              "--overwrite); this result was not saved: choose another --out")
    try:
        _check_owned(dst)
    except ValueError as exc:
        raise FileExistsError(f"{exc}; it changed while this checkpoint was being written, so this result was not "
                              "saved") from None
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
    try:
        files = owned_files(old)  # again, now that nothing can be added under the name `dst`
    except ValueError:
        files = None
    if files is None:
        os.rename(old, dst)
        raise FileExistsError(f"{dst} changed while this checkpoint was being published (a file appeared in it) and "
                              "was left as it is; this result was not saved: choose another --out")
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    remove_owned(old, files)


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


def check_output_file(path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """A file about to be written: not a directory, in an existing writable directory, and (overwrite=False, what
    every CLI `--json` / `--plot` without --overwrite asks) not an existing file. Raises ValueError."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give a file name")
    if not overwrite and (p.exists() or p.is_symlink()):
        raise ValueError(f"{p} exists; choose another file name or pass --overwrite to replace it")
    if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise ValueError(f"directory {p.parent} does not exist or is not writable; create it first")
    return p


def publish_file(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Give the finished file `src` (in the directory of `dst`) the name `dst` in one step. With `overwrite`:
    os.replace (atomic). Without: os.link, which fails when `dst` exists, so a file that appeared meanwhile is never
    replaced (FileExistsError, "not saved"); `src` is then still there for the caller to remove."""
    if overwrite:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(f"{dst} appeared while this result was being written and was left as it is; this "
                              "result was not saved: choose another file name or pass --overwrite") from None


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write `obj` as JSON atomically: a temporary file beside `path` (mode from the umask), then publish_file.
    overwrite=False never replaces an existing file (ValueError before writing, FileExistsError if one appeared
    while writing); the default replaces, for result files a script rewrites as it goes."""
    p = check_output_file(path, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
        publish_file(Path(tmp), p, overwrite=overwrite)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after os.replace; the second name after os.link
    return p


def load_report(path: str | os.PathLike) -> dict:
    """Read the sparsefast.json of a saved checkpoint directory."""
    report = Path(path) / REPORT_NAME
    if not report.is_file():
        raise FileNotFoundError(f"{report} not found: {path} is not a checkpoint written by `sparsefast prune`")
    return json.loads(report.read_text())
