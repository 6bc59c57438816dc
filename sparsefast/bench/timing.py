"""Timing for benchmarks: medians, measured in the same run as the baseline they are compared with.

CUDA: `triton.testing.do_bench` (median; L2 flushed before each call; warm-up first), optionally of a CUDA graph of
one call, which is device time without host overhead: the fair comparison of kernels, while the eager time is what
an eager module pays (both are worth recording; bench/micro/bench_sparse24_matmul.py records both). Without CUDA the
benchmarks run in quick mode (tiny shapes, Triton under the interpreter) only to keep the harness working: those
timings mean nothing, and a few calls timed with perf_counter are all they get.
CPU kernels that compete for DRAM are timed by sparsefast.nn.dispatch's interleaved timer instead (call by call, weights
read cold), the one the measured CPU swap uses.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A replay of a CUDA graph of one call of fn (captured on a side stream, as torch requires)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100, cuda_graph: bool = False,
            untimed_calls: int = 0, cpu_calls: int = 1) -> float:
    """Median milliseconds per call of fn.

    CUDA: do_bench(warmup_ms, rep_ms) after `untimed_calls` calls (first-call allocations, plan set-ups, lazy
    inits); `cuda_graph=True` times the replay of a graph of one call. Baselines that take tens of ms per call want a
    shorter warmup_ms/rep_ms. Without CUDA: the median of `cpu_calls` perf_counter-timed calls (quick mode)."""
    if not _cuda():
        times = []
        for _ in range(cpu_calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    for _ in range(untimed_calls):
        fn()
    return float(do_bench(_graphed(fn) if cuda_graph else fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_once_s(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call, synchronised on CUDA (for baselines too slow to repeat, e.g. SparseGPT)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def warm_up_gpu(seconds: float = 0.5) -> None:
    """Large fp16 matmuls until the clocks are up, so the first timed row is not measured on an idle GPU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
