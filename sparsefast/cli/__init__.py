"""The `sparsefast` command (also `python -m sparsefast`). One module per subcommand; each defines
`add_parser(subparsers)` that registers its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand module names under sparsefast.cli, in the order `--help` lists them
SUBCOMMANDS = ("prune", "eval", "bench", "prune_structured", "recover")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefast", description="Prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run them fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"sparsefast.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # bad input and environment problems: one readable line, no traceback
        print(f"sparsefast {args.command}: error: {exc}", file=sys.stderr)
        return 2
