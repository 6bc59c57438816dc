"""CPU CI: every csrc/**/*.cu compiles with plain `nvcc -c` for sm_80 and sm_90a (kernel files are torch-free),
with no register spills or local-memory stack frames reported by ptxas. Skips when nvcc is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = ("80", "90a")
SOURCES = sorted(CSRC.rglob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _compile(src: Path, arch: str, out_dir: str) -> tuple[str, int, str]:
    cmd = [NVCC, "-c", "-O3", "-std=c++17", f"-I{CSRC}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", str(src), "-o", os.path.join(out_dir, f"{src.stem}_{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return f"{src.relative_to(CSRC)} sm_{arch}", proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def results() -> list[tuple[str, int, str]]:
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda job: _compile(job[0], job[1], tmp), jobs))


def test_sources_found():
    assert any(p.parent.name == "sparse24" for p in SOURCES), f"no kernel sources under {CSRC}"


def test_every_kernel_compiles(results):
    failed = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failed, "nvcc failed:\n" + "\n".join(failed)


def test_no_spills_or_stack(results):
    bad = []
    for name, rc, log in results:
        for m in re.finditer(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
            if any(int(v) for v in m.groups()):
                bad.append(f"{name}: {m.group(0)}")
    assert not bad, "ptxas reports local memory use:\n" + "\n".join(bad)
