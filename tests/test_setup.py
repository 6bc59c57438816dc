"""Packaging (setup.py): the Triton kernels in the top-level `kernels/` folder ship as `sparsefast.kernels` and can
never be imported as a top-level package named `kernels`, the name of Hugging Face's PyPI package that transformers
(>= 5.25) imports. A `kernels/__init__.py` made every `from_pretrained` fail whenever the repository root was on
sys.path (pytest or python run from a clone): "cannot import name 'CUDAProperties' from 'kernels'"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_from_repo_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root as the working directory: sys.path[0] is then the root, as for
    `python -m pytest` or a script run in a clone."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_kernels_folder_is_not_a_regular_package():
    assert (REPO / "kernels" / "wanda_mask.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular top-level package `kernels`, which shadows Hugging Face's")


def test_hf_kernels_package_wins_from_the_repository_root():
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` package is not installed; it is in the dev extra for this test")
    proc = _run_from_repo_root("import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    resolved = Path(proc.stdout.strip()).resolve()
    assert REPO / "kernels" not in resolved.parents, f"`import kernels` from the repo root gave ours: {resolved}"


def test_from_pretrained_works_from_the_repository_root(story_llama_dir):
    proc = _run_from_repo_root(
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(story_llama_dir)!r})\n"
        "print(type(m).__name__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "LlamaForCausalLM"


def test_triton_kernels_import_as_sparsefast_kernels(tmp_path):
    """From a directory outside the clone (the installed package, editable here)."""
    proc = subprocess.run([sys.executable, "-c", "import sparsefast.kernels.wanda_mask as m; print(m.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (REPO / "kernels" / "wanda_mask.py").resolve()


def test_wheel_holds_the_kernels_under_sparsefast_only(tmp_path):
    """A regular (non-editable) install: the wheel built from a copy of this tree (pip builds in the source tree,
    so the copy keeps build/ out of the clone; pure Python: no compiler, no CUDA build even where torch has CUDA),
    links kept as links."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("sparsefast", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    env = {**os.environ, "SPARSEFAST_NO_COMPILER": "1", "SPARSEFAST_BUILD_CUDA": "0"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("sparsefast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("sparsefast/kernels/")}
    assert {p.name for p in (REPO / "kernels").glob("*.py")} <= shipped
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package would shadow HF's"
