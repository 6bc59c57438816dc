"""Shared benchmark plumbing: timing (triton.testing.do_bench median on CUDA), the device copy bandwidth measured in
the same run, run metadata (device, versions, commit) and the JSON writer for bench/results/.

Results land in bench/results/<date>-<device>-<what>.json (and in $OUT when set, for the device runner). Quick mode
(CPU, no CUDA) exists only to keep the harness working in CI: its timings are interpreter timings and mean nothing.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sparsefast.checkpoint import write_json

REPO = Path(__file__).resolve().parents[2]
# $BENCH_RESULTS_DIR redirects results (bench/gpu/run.sh --dry-run, whose timings mean nothing, uses a temp dir)
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or REPO / "bench" / "results")
QUICK = not torch.cuda.is_available()
QUICK_SHAPES = [("tiny", "odd", 5, 96), ("tiny", "wide", 3, 520)]


def bench_shapes() -> list[tuple[str, str, int, int]]:
    """[(model, linear, out, in)]: every distinct LLaMA shape on CUDA (only the models named in $BENCH_MODELS, a
    comma list, when set), two tiny ones in quick mode (CPU)."""
    from bench.shapes import select_shapes

    return QUICK_SHAPES if QUICK else select_shapes(os.environ.get("BENCH_MODELS"))


def shape_id(shape: tuple[str, str, int, int]) -> str:
    return f"{shape[0]}-{shape[1]}-{shape[2]}x{shape[3]}"


def time_ms(fn: Callable[[], Any], *, fast: bool = True) -> float:
    """Median milliseconds per call. CUDA: triton.testing.do_bench (L2 flushed between calls, warm-up first);
    `fast=False` shortens warm-up/repetitions for baselines that take tens of ms per call. CPU (quick mode, the
    interpreter): one timed call."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        warmup, rep = (25, 100) if fast else (5, 30)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_once_s(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call, synchronised (for baselines too slow to repeat, e.g. SparseGPT)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted), the roofline for memory-bound
    kernels. CPU: a small memcpy, for the harness only."""
    if not torch.cuda.is_available():
        nbytes = 1 << 22
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() or "no-commit") + ("-dirty" if dirty else "")


def cpu_info() -> dict[str, Any]:
    """The CPU a CPU measurement ran on (lscpu's model name and counts) and torch's thread count."""
    info: dict[str, Any] = {"processor": platform.processor(), "nproc": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Architecture"):
            info[key.strip()] = value.strip()
    return info


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


def run_metadata() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": git_commit(),
            "quick_mode": not torch.cuda.is_available()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_result(what: str, payload: dict[str, Any], out_dir: Path | None = None) -> list[Path]:
    """Write {metadata, **payload} to <out_dir or bench/results>/<date>-<device>-<what>.json atomically, plus a copy
    under $OUT when that is set. Returns the written paths."""
    data = {"what": what, "metadata": run_metadata(), **payload}
    name = f"{_dt.date.today().isoformat()}-{_slug(device_name())}-{_slug(what)}.json"
    dirs = [Path(out_dir) if out_dir is not None else RESULTS_DIR]
    if os.environ.get("OUT") and out_dir is None:
        dirs.append(Path(os.environ["OUT"]))
    paths = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        paths.append(write_json(d / name, data))
    return paths
