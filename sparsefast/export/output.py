"""Single-file outputs (a .gguf), written with the same rules as sparsefast's checkpoint directories
(sparsefast.checkpoint): checked before any work, written into a locked `.NAME.partial-*` directory beside the
target (a killed run's partial is removed by the next save to the same target, `remove_stale_partials`), then
published in one step that cannot replace a file which appeared meanwhile.

Publishing (sparsefast.checkpoint.publish_file): a new target is hard-linked into place (`os.link` fails if the name
exists: of two writers racing to one new target exactly one wins, the other gets FileExistsError, "not saved"); with
overwrite an existing target is replaced (`os.replace`, atomic) only when `is_own_file` says sparsefast wrote it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sparsefast.checkpoint import (
    PARTIAL_TAG,
    check_apart_from_sources,
    check_output_file,
    current_umask,
    publish_file,
    remove_stale_partials,
)


def check_output_path(out: str | os.PathLike, *, overwrite: bool, is_own_file: Callable[[Path], bool],
                      sources: Iterable[str | os.PathLike] = (), what: str = "file") -> Path:
    """Validate the file `out` before any work; returns its resolved path. Raises ValueError naming the fix.

    Refused (beyond sparsefast.checkpoint.check_output_file: a directory, an existing file without `overwrite`, a
    parent that is not an existing writable directory): the model source itself or a path inside a source
    directory (check_apart_from_sources); with `overwrite`, an existing file unless `is_own_file(path)`."""
    path = Path(out).expanduser().resolve()
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a {what} file name, e.g. --out {path / 'model'}.{what}")
    check_apart_from_sources(path, sources)
    check_output_file(path, overwrite=overwrite)
    if path.exists() and not is_own_file(path):
        raise ValueError(f"output {path} exists and was not written by sparsefast export; --overwrite replaces "
                         "only a file sparsefast wrote: choose another --out")
    return path


@contextlib.contextmanager
def atomic_output_file(path: Path, *, overwrite: bool, is_own_file: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a file path inside a new, locked partial directory beside `path`; when the block succeeds the file is
    published to `path` (module docstring), when it raises (or is interrupted) the partial is removed and `path`
    is left as it was. Raises FileExistsError when `path` appeared meanwhile and may not be replaced."""
    remove_stale_partials(path)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL_TAG}", dir=path.parent))
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the end: marks the partial as alive (released if killed)
    try:
        tmp = partial / path.name
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        replace = overwrite and path.exists()
        if replace and not is_own_file(path):
            raise FileExistsError(f"{path} was replaced by a file sparsefast did not write while this one was being "
                                  "written, and was left as it is; this result was not saved: choose another --out")
        publish_file(tmp, path, overwrite=replace)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        os.close(fd)
