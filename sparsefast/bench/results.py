"""Where benchmark results go and what each one carries.

Naming: `bench/results/YYYY-MM-DD-<device>-<what>.<ext>`, one convention for every writer. `<device>` is `cpu` for a
CPU run, else the GPU's model in lower case (`h100`, `h200`, `a100`, `rtx-4090`: `gpu_slug`); `<what>` is a slug of
the measurement (`sparse24-matmul`, `decode-smollm2`); a plot keeps its JSON's stem. The date is the UTC day of the
run. A newer run of the same measurement replaces the older file (git keeps the history); bench/RESULTS.md indexes
the current files and the README section that cites each.

Every result carries `run_metadata()`: date, device name, torch/triton/CUDA/Python versions, git commit (`-dirty`
when tracked files differ from it), the CPU (lscpu's model name and counts) and the load average at the start, so a
number measured on a busy machine says so.

The directory: $BENCH_RESULTS_DIR when set (bench/gpu/run.sh --dry-run points it at a temp dir: its timings mean
nothing), else bench/results of the clone this package runs from, else ./bench/results. `write_result` also copies
the file into $OUT when that is set (the device runner returns what a command writes there).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

RESULTS_ENV = "BENCH_RESULTS_DIR"
_CLONE = Path(__file__).resolve().parents[2]  # the repository root when sparsefast runs from a clone
# words of a GPU's marketing name that do not tell two models apart
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def results_dir() -> Path:
    """The directory results are written to (see the module docstring)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    clone = _CLONE / "bench" / "results"
    return clone if clone.is_dir() else Path.cwd() / "bench" / "results"


def slug(text: str) -> str:
    """Lower case, runs of anything but [a-z0-9] collapsed to one '-': "sparse24_matmul" -> "sparse24-matmul"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_slug(name: str) -> str:
    """The device part of a result name for a GPU: its model without vendor words and what follows the first word
    with a digit. "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090"
    -> "rtx-4090"."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    for i, word in enumerate(words):
        if any(c.isdigit() for c in word):
            return "-".join(words[:i + 1])
    return "-".join(words) or "gpu"


def device_slug(device: str = "auto") -> str:
    """`cpu`, or `gpu_slug` of CUDA device 0. "auto": CUDA when it is available."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return gpu_slug(torch.cuda.get_device_name(0))


def result_name(what: str, device: str, ext: str = "json", date: _dt.date | None = None) -> str:
    """`YYYY-MM-DD-<device>-<what>.<ext>` (today in UTC unless `date` is given); `device` is a slug: "cpu", "h100"."""
    if not slug(what):
        raise ValueError(f"result name needs a measurement name with letters or digits, got {what!r}")
    day = date or _dt.datetime.now(_dt.timezone.utc).date()
    return f"{day.isoformat()}-{slug(device)}-{slug(what)}.{ext}"


def result_path(what: str, *, device: str = "auto", out_dir: str | os.PathLike | None = None,
                ext: str = "json") -> Path:
    """Path of today's result `what` on `device` ("auto", "cpu", "cuda") in `out_dir` (default `results_dir()`)."""
    directory = Path(out_dir) if out_dir is not None else results_dir()
    return directory / result_name(what, device_slug(device), ext)


def git_commit() -> str:
    """HEAD of the clone this package runs from, with "-dirty" when tracked files differ; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_CLONE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_CLONE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def load_average() -> list[float] | None:
    """os.getloadavg() (1, 5, 15 minutes), None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def kernel_isa() -> str | None:
    """The instruction set sparsefast's CPU kernels run here: $SPARSEFAST_CPU_ISA where set (validated), else the
    best this CPU has (None without a prebuilt CPU extension: metadata never starts a JIT build of the kernels)."""
    import torch

    from sparsefast._ext import load_cpu_extension
    from sparsefast.ops.sparse24_cpu import ISA_NAMES, cpu_isa

    forced = cpu_isa()
    if forced:
        return ISA_NAMES[forced]
    if not load_cpu_extension(jit=False):
        return None
    return ISA_NAMES[int(torch.ops.sparsefast.cpu_best_isa())]


def cpu_info() -> dict[str, Any]:
    """The CPU a measurement ran on (lscpu's model name and counts), torch's thread count and the instruction set
    of sparsefast's CPU kernels."""
    import torch

    info: dict[str, Any] = {"processor": platform.processor(), "nproc": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "kernel_isa": kernel_isa()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Architecture"):
            info[key.strip()] = value.strip()
    return info


def run_metadata(device: str = "auto") -> dict[str, Any]:
    """What every result carries (module docstring). `device`: "auto", "cpu" or "cuda", as for `result_path`."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device != "cpu" and torch.cuda.is_available()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "device_slug": device_slug(device),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": git_commit(), "load_average": load_average(),
            "cpu": cpu_info()}


def commit_of(result: dict[str, Any]) -> str | None:
    """The git commit a result was measured at: its metadata's, or the top-level "git_commit" of older results."""
    return result.get("metadata", {}).get("git_commit") or result.get("git_commit")


def write_result(what: str, payload: dict[str, Any], *, device: str = "auto",
                 out_dir: str | os.PathLike | None = None, overwrite: bool = True) -> list[Path]:
    """Write {"what", "metadata": run_metadata(), **payload} atomically to `result_path(what, ...)`, plus a copy
    under $OUT when that is set and `out_dir` is not given. overwrite=False never replaces an existing result
    (`write_json`'s exclusive publish). Returns the written paths."""
    from sparsefast.checkpoint import write_json

    path = result_path(what, device=device, out_dir=out_dir)
    data = {"what": what, "metadata": run_metadata(device), **payload}
    targets = [path] + ([Path(os.environ["OUT"]) / path.name] if os.environ.get("OUT") and out_dir is None else [])
    written = []
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_json(target, data, overwrite=overwrite))
    return written


def save_figure(fig: Any, path: str | os.PathLike, *, overwrite: bool = True, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG to `path` atomically (a hidden partial file, then published), close it, and
    return the path; an existing `path` is refused unless `overwrite`."""
    import matplotlib.pyplot as plt

    from sparsefast.checkpoint import publish_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        plt.close(fig)
        publish_file(tmp, path, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path
