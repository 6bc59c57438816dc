"""Proof that sparsefast wrote an output directory, and the removal of exactly what it wrote.

Every save (sparsefast.checkpoint) writes, last, a record of the files it put in the directory:
`sparsefast-output.json` = {"format": "sparsefast-output/1", "files": [relative POSIX paths, sorted]}. The record
is the only proof of ownership: a file named sparsefast.json or structure.json proves nothing (users write reports
under that name, `--json sparsefast.json`). `--overwrite` may replace a directory only when the record parses, names
only plain files inside the directory (no absolute path, no `..`, no symbolic link on the way), and the directory
holds nothing else; replacing it then removes the listed files, the record and the directories that held them,
and never anything else.

A run also takes the output's lock before its work (`take_lock` on `.NAME.lock` beside it, held by
sparsefast.checkpoint.OutputClaim until the save), so of two concurrent runs on one output exactly one writes.

This module knows nothing about checkpoints; sparsefast.checkpoint decides what a directory without a record is
(empty, an earlier version's output, someone else's) and words the refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path, PurePosixPath

RECORD_NAME = "sparsefast-output.json"
RECORD_FORMAT = "sparsefast-output/1"


def write_record(root: Path) -> Path:
    """Record every file now under directory `root` (symbolic links are not followed) in RECORD_NAME; call it when
    everything else is written. Returns the record's path."""
    files = sorted((Path(base) / name).relative_to(root).as_posix()
                   for base, _, names in os.walk(root, onerror=_raise) for name in names)
    record = root / RECORD_NAME
    record.write_text(json.dumps({"format": RECORD_FORMAT, "files": files}, indent=1) + "\n")
    return record


def owned_files(root: Path) -> list[str] | None:
    """The files of directory `root` its record lists (relative POSIX paths), once every check passed; None when
    `root` has no record (a regular file named RECORD_NAME).

    Raises ValueError, naming the path and the fix, when the record does not parse or is not ours, lists a path
    outside `root` or through a symbolic link, or `root` holds anything the record does not list (a file, a link,
    a directory that leads to no listed file)."""
    record = root / RECORD_NAME
    if record.is_symlink() or not record.is_file():
        if record.is_symlink() or record.exists():
            raise ValueError(f"{record} is not a regular file, so it is not a record sparsefast wrote; delete {root} "
                             "yourself or choose another --out")
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{record} does not parse ({exc}); without it sparsefast cannot tell its files from yours: "
                         f"delete {root} yourself or choose another --out") from None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{record} is not a {RECORD_FORMAT} record (a format tag and a list of file names); delete "
                         f"{root} yourself or choose another --out")
    for name in files:
        _check_listed(root, record, name)
    listed = set(files)
    on_the_way = {p.as_posix() for name in files for p in PurePosixPath(name).parents if p.parts}
    for base, dirs, names in os.walk(root, onerror=_raise):
        here = Path(base).relative_to(root)
        for name in dirs + names:
            rel = (here / name).as_posix()
            allowed = on_the_way if name in dirs else listed | {RECORD_NAME}
            if rel not in allowed or (Path(base) / name).is_symlink():
                raise ValueError(f"{root} holds {rel}, which sparsefast did not write (it is not in {RECORD_NAME}); "
                                 f"--overwrite removes only the files sparsefast wrote: move {rel} out of {root} or "
                                 "choose another --out")
    return sorted(listed)


def remove_owned(root: Path, files: list[str]) -> bool:
    """Remove the listed `files` (as owned_files returned them), the record, the directories that held them (deepest
    first) and `root` if it is then empty. Anything else that appeared meanwhile is kept, and so is every directory
    holding it (said on stderr). Returns whether `root` is gone."""
    for name in files:
        (root / name).unlink(missing_ok=True)
    (root / RECORD_NAME).unlink(missing_ok=True)
    dirs = {p for name in files for p in PurePosixPath(name).parents if p.parts}
    for rel in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            (root / rel).rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # not empty: something sparsefast did not write
            continue
    try:
        root.rmdir()
    except OSError:
        print(f"sparsefast: kept {root}: it holds files sparsefast did not write", file=sys.stderr)
        return False
    return True


def make_parents(directory: Path) -> list[Path]:
    """mkdir -p `directory` (modes from the umask); returns the directories this call made, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        made.append(d)
    return made


def take_lock(lock: Path, target: Path) -> int:
    """An exclusive, non-blocking flock on the file `lock`, made if missing. The holder removes the file as it
    releases, so a lock taken on a file that is no longer at `lock` is retried on the new one."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(f"another sparsefast run is writing {target} (it holds {lock}); this result was "
                                  "not saved: wait for that run to finish or choose another --out") from None
        try:
            current = os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


def _check_listed(root: Path, record: Path, name: str) -> None:
    """A listed name must stay inside `root` and name a regular file (or nothing: deleted since), reached without
    passing through a symbolic link."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts or rel.as_posix() != name or name == RECORD_NAME:
        raise ValueError(f"{record} lists {name!r}, which is not a file inside {root}; it is not a record sparsefast "
                         f"wrote: delete {root} yourself or choose another --out")
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise ValueError(f"{record} lists {name!r}, and {path} is a symbolic link; --overwrite never follows "
                             f"links: delete {root} yourself or choose another --out")
    if path.exists() and not path.is_file():
        raise ValueError(f"{record} lists {name!r}, and {path} is not a regular file; delete {root} yourself or "
                         "choose another --out")


def _raise(exc: OSError) -> None:
    """os.walk's onerror: an unreadable directory could hide a user's file, so it stops the check."""
    raise exc
