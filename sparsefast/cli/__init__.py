"""The `sparsefast` command (also `python -m sparsefast`). One module per subcommand; each defines
`add_parser(subparsers)` that registers its parser and sets `func(args) -> int`. Subcommand modules import only
argparse-level names at module level (torch, transformers and the engine inside `func`), so `sparsefast --help` and
`--version` answer without importing torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sparsefast import __version__

# subcommand module names under sparsefast.cli, in the order `--help` lists them
SUBCOMMANDS = ("prune", "eval", "bench", "prune_structured", "recover", "serve", "generate", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefast", description="Prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run them fast.")
    parser.add_argument("--version", action="version", version=f"sparsefast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"sparsefast.cli.{name}").add_parser(sub)
    return parser


def _dir_state(path: str | None) -> tuple[int, int] | None:
    """(inode, mtime) of `path`, or None: whether a save replaced or created it during the run."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns) if st else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    before = _dir_state(out)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # saves are atomic: an interrupted one has removed its partial directory and left `out` as it was
        if out is None:
            what = "interrupted"
        elif _dir_state(out) == before:
            what = f"interrupted; nothing was written to {out}"
        else:
            what = f"interrupted after {out} was saved"
        print(f"sparsefast {args.command}: {what}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # bad input and environment problems (OSError covers missing/existing files, permissions, a full disk):
        # one readable line, no traceback
        print(f"sparsefast {args.command}: error: {exc}", file=sys.stderr)
        return 2
