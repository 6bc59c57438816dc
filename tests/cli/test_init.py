"""The `sparsefast` command itself (sparsefast/cli/__init__.py): --version, and --help without importing torch."""

from __future__ import annotations

import subprocess
import sys

import sparsefast


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsefast", *args], capture_output=True, text=True, timeout=300)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"sparsefast {sparsefast.__version__}"


def test_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys; from sparsefast.cli import SUBCOMMANDS, build_parser; h = build_parser().format_help(); "
            "print(all(c.replace('_', '-') in h for c in SUBCOMMANDS), "
            "sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True []"


def test_help_exits_zero():
    proc = _cli("--help")
    assert proc.returncode == 0
    assert "usage: sparsefast" in proc.stdout
