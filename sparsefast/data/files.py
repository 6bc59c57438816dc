"""Finding data files (explicit dir → $SPARSEFAST_DATA → bundled copy), reading text/JSON documents, tokenizing.

Relative paths follow one layout everywhere (the bundled copy, `--data-dir`, `$SPARSEFAST_DATA`, ../shared/data):
`wikitext-2-raw/wiki.test.raw`, `ptb/ptb.test.txt`, `ptb/ptb.valid.txt`, `c4/c4-sample.00000-of-00001.json.gz`, ...
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DATA_ENV = "SPARSEFAST_DATA"


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """An explicit data directory (--data-dir) must exist: a typo would otherwise silently fall back to the bundled
    copies. Raises FileNotFoundError."""
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist or is not a directory; pass the directory "
                                f"that holds the datasets (or omit it to use ${DATA_ENV} and the bundled copies)")


def data_search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for data files, in order: `data_dir` (must exist), `$SPARSEFAST_DATA`, the bundled
    copy."""
    check_data_dir(data_dir)
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser())
    dirs.append(BUNDLED_DIR)
    return dirs


def find_data_file(relpath: str | Sequence[str], data_dir: str | os.PathLike | None = None) -> Path:
    """Locate a data file by its relative path.

    Args:
        relpath: one relative path, or several in order of preference (each is tried in every directory before the
            next one is considered, so a preferred file anywhere beats a fallback in an earlier directory).
        data_dir: explicit directory searched first (the CLI's --data-dir).

    Returns the first existing file. Raises FileNotFoundError listing every path looked at and how to fix it.
    """
    relpaths = [relpath] if isinstance(relpath, str) else list(relpath)
    looked: list[Path] = []
    for rel in relpaths:
        for base in data_search_dirs(data_dir):
            candidate = base / rel
            looked.append(candidate)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"data file {' or '.join(relpaths)} not found; looked at: {', '.join(map(str, looked))}. "
        f"Put it under a directory with the same relative path and pass --data-dir DIR (API: data_dir=DIR) "
        f"or set {DATA_ENV}=DIR"
    )


def read_text(path: str | os.PathLike) -> str:
    """Whole file as UTF-8 text (transparently gunzipped for *.gz). Line ends are kept as in the file.

    Raises ValueError naming the file for a *.gz that is not (complete) gzip and for bytes that are not UTF-8."""
    path = Path(path)
    gz = path.suffix == ".gz"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 .txt, .json or "
                         ".jsonl file (optionally .gz)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a valid gzip file ({exc}); decompress it or drop the .gz suffix if it is "
                         "plain text") from None


def split_lines(text: str) -> list[str]:
    """Lines as `for line in file` yields them, without their "\\n" (and no phantom empty line after a final
    newline). Unlike str.splitlines this splits on "\\n" only, as HF dataset builders read files."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_documents(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Documents of a local corpus file.

    - `.jsonl` / `.jsonl.gz`: one JSON value per line, an object with `field` or a bare string.
    - `.json` / `.json.gz`: a JSON list (of such objects or strings), or an object whose `field` is a list of
      strings; a file that is really JSON lines (as the C4 `*.json.gz` shards are) is read as JSON lines.
    - anything else (`.txt`, `.raw`, ...): the whole file is ONE document (a continuous text stream).
    Empty documents are dropped. Raises FileNotFoundError for a missing file, ValueError for malformed JSON.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration/eval file not found: {path.resolve()}")
    name = path.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    text = read_text(path)
    if stem.endswith(".jsonl"):
        values = _json_lines(text, path)
    elif stem.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            if "Extra data" not in exc.msg:
                raise ValueError(f"{path}: invalid JSON ({exc})") from exc
            values = _json_lines(text, path)
        if isinstance(values, dict):
            values = values.get(field)
        if not isinstance(values, list):
            raise ValueError(f"{path}: expected a JSON list of documents or an object with a {field!r} list")
    else:
        values = [text]
    docs = [_doc_text(v, field, path) for v in values]
    return [d for d in docs if d]


def _json_lines(text: str, path: Path) -> list:
    out = []
    for lineno, line in enumerate(split_lines(text), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from exc
    return out


def _doc_text(value, field: str, path: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get(field), str):
        return value[field]
    raise ValueError(f"{path}: every record must be a string or an object with a string {field!r} field, "
                     f"got {str(value)[:80]!r}")


def tokenize(tokenizer, texts: str | Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (a single string gives a one-element list), exactly as `tokenizer(text)` would give
    them (special tokens such as LLaMA's BOS included by default), without truncation and without transformers'
    "sequence longer than the maximum length" warning: these long texts are cut into windows afterwards."""
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not batch:
        return []
    encoded = tokenizer(batch, add_special_tokens=add_special_tokens, truncation=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]
