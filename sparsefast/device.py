"""Device and dtype names as users type them (CLI flags, API arguments) → torch objects, with clear errors.

torch is imported inside the functions: the CLI parsers take DEVICE_CHOICES / DTYPE_CHOICES from here, and
`sparsefast --help` must not import torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
# which implementation runs an op (sparsefast.ops._dispatch.select_backend says how "auto" picks)
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "torch")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" (or a torch.device) to a usable torch.device.

    "auto" picks cuda:0 when CUDA is available, else cpu. Asking for CUDA on a machine without it raises
    ValueError before any work starts (instead of torch's error deep inside a forward pass).
    """
    import torch

    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(dev)!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(dev)!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        dev = torch.device("cuda", index)
    return dev


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map "auto" | None → None (let the loader decide) and "float32" | "float16" | "bfloat16" (or fp32/fp16/bf16,
    or a torch.dtype) → that torch.dtype. Anything else is a ValueError listing the choices."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = str(name).strip().lower()
    if key not in aliases:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return aliases[key]


def available_memory_bytes() -> int | None:
    """Memory a new allocation may take without swapping or being OOM-killed: the kernel's MemAvailable
    (/proc/meminfo), lowered to the headroom of this process's cgroup limit where one is set (a container sees the
    host's MemAvailable). None where neither is known."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    headroom = _cgroup_memory_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def _cgroup_memory_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2: memory.max / memory.current; v1: limit_in_bytes /
    usage_in_bytes), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes a huge number for "none"
            return None
        return max(int(limit) - usage, 0)
    return None


def return_freed_memory() -> None:
    """Give the heap memory Python and torch have freed back to the OS (glibc's malloc_trim; nothing elsewhere).
    Freed blocks below glibc's mmap threshold otherwise stay in the process's resident set, so a loop that frees
    and reallocates ~100 MB each step (pruning from disk, one decoder layer at a time) creeps upwards."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


_LIBC = None  # loaded by return_freed_memory on first use; False where there is no C library to load


THREADS_HELP = ("CPU threads: auto (default: the cores this process may use that no other process keeps busy, and "
                "at most the container's CPU quota) or a number")


def parse_threads(text: str) -> int | None:
    """--threads as typed: "auto" → None (decide with cpu_threads), else a positive int; ValueError otherwise."""
    key = str(text).strip().lower()
    if key == "auto":
        return None
    if not key.isdigit() or int(key) < 1:
        raise ValueError(f"--threads {text!r} is not auto or a positive number of threads; "
                         "use --threads auto or e.g. 2")
    return int(key)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{cpu: (busy jiffies, total jiffies)} from /proc/stat ({} where it does not exist)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def _cgroup_cpu_quota() -> int | None:
    """Whole CPUs the cgroup (v2 cpu.max, v1 cfs quota) allows, rounded up; None without a limit."""
    import math

    for path, split in (("/sys/fs/cgroup/cpu.max", None), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "v1")):
        try:
            text = open(path).read().split()
            if split == "v1":
                text = [text[0], open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().split()[0]]
        except (OSError, IndexError):
            continue
        if len(text) < 2 or text[0] in ("max", "-1"):
            return None
        return max(1, math.ceil(int(text[0]) / int(text[1])))
    return None


def free_cpu_cores(window_s: float = 0.3, busy_fraction: float = 0.5) -> int:
    """How many threads a CPU engine should run: the cores this process may use (its affinity), less those that
    other processes kept busy (> busy_fraction of `window_s`, from /proc/stat; call it while this process is idle,
    i.e. before loading), and at most the cgroup's CPU quota; at least 1.

    Why: every OpenMP region of a decode step waits for its slowest thread, so a thread that shares a core with a
    busy process makes each of the step's ~200 regions wait for the scheduler to give it that core back (the
    benchmark's busy-core run: ~20x slower per token with 2 threads on 2 cores, one of them busy)."""
    import os
    import time

    allowed = os.sched_getaffinity(0)
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    busy = set()
    for cpu in allowed & before.keys() & after.keys():
        d_busy, d_total = (a - b for a, b in zip(after[cpu], before[cpu]))
        if d_total > 0 and d_busy / d_total > busy_fraction:
            busy.add(cpu)
    free = len(allowed) - len(busy)
    quota = _cgroup_cpu_quota()
    return max(1, min(free, quota) if quota is not None else free)


def set_cpu_threads(threads: int | None) -> int:
    """torch's intra-op threads for a CPU engine: `threads`, or free_cpu_cores() for None (auto). Call before the
    model is loaded and before anything is compiled (inductor's C++ kernels keep the count they were compiled with).
    Returns the count set."""
    import torch

    n = free_cpu_cores() if threads is None else threads
    torch.set_num_threads(n)
    return n
