"""Bytes and bandwidth: what a kernel or a decode step moves, and the roofline it is compared with.

A memory-bound kernel is judged by GB/s = bytes it must move / median time, against the copy bandwidth measured in
the same run on the same device (bytes read + bytes written), never against a datasheet figure: clocks, NUMA and a
shared machine's load all move the real ceiling. Decode adds a read-only pass (torch.sum over a buffer), the
ceiling for a step that only reads weights.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (numel × element size), summed."""
    return sum(t.numel() * t.element_size() for t in tensors)


def gbs(nbytes: int, ms: float) -> float:
    """GB/s of moving `nbytes` in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int | None = None, reps: int = 5) -> float:
    """Median copy GB/s (read + write) of an fp32 buffer of `nbytes` (default 1 GiB on CUDA, 256 MiB on CPU): the
    roofline for the median per-kernel GB/s of the microbenchmarks. CUDA: triton.testing.do_bench; CPU: `reps`
    timed copies at torch's current thread count, after two untimed ones."""
    import torch

    nbytes = nbytes or (1 << 30 if device == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device == "cuda":
        from sparsefast.bench.timing import time_ms

        ms = time_ms(lambda: dst.copy_(src))
    else:
        from sparsefast.nn.dispatch import interleaved_median_ms

        ms = statistics.median(interleaved_median_ms({"copy": lambda: dst.copy_(src)}, reps=reps)["copy"])
    return gbs(2 * tensor_bytes(src), ms)


def memory_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> dict[str, float]:
    """Best of `reps`: copy GB/s (bytes read + written) and read GB/s (a sum over the buffer), synchronised; the
    ceilings a decode step's weight GB/s is compared with."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        t1 = time.perf_counter()
        src.sum()
        sync()
        t2 = time.perf_counter()
        copy.append(2 * nbytes / (t1 - t0) / 1e9)
        read.append(nbytes / (t2 - t1) / 1e9)
    return {"copy_gbs": max(copy), "read_gbs": max(read), "buffer_bytes": nbytes}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (getrusage; Linux reports KiB, macOS bytes): on CPU the memory
    number that matters, and monotonic, so a later measurement's value covers every earlier one too."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
