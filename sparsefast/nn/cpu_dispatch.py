"""Which path a sparse linear takes on the CPU, by number of tokens M: measured on the machine that runs it.

A CPU's balance of memory bandwidth and vector throughput varies between machines (and with threads), so there is no
table to ship: `calibrate_cpu_dispatch` times, on this machine and at the current torch thread count, the layer's
own packed weight with the sparse kernel against torch's dense F.linear on the dense-with-zeros weight, at
CALIBRATION_TOKENS, interleaving the two (the same conditions for both) and taking medians. A token bucket uses the
kernel only when its median beats dense by MARGIN; otherwise that bucket runs dense, so a swapped layer is never
slower than dense by more than the timing noise, by design. Results are cached per (shape, dtype, layout, sparsity
to 2 decimals, threads) for the life of the process: one calibration serves every layer of that shape (a SmolLM2-135M
swap calibrates 4 shapes x its layouts in a few seconds).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from sparsefast.nn.sparse24_linear import DispatchTable

CALIBRATION_TOKENS = (1, 4, 16, 64)
MARGIN = 0.95  # the kernel must take at most 95% of dense's median time to be chosen
DEFAULT_CPU_DISPATCH = DispatchTable(((64, "cpu"), (2**62, "dense")),
                                     source="default (unmeasured): CPU kernels for M <= 64")
_CACHE: dict[tuple, tuple[DispatchTable, dict]] = {}


def interleaved_median_ms(fns: dict[str, Callable[[], object]], *, reps: int, budget_s: float = float("inf"),
                          warmup: int = 2) -> dict[str, list[float]]:
    """Call each fn in turn, `reps` rounds (fewer if `budget_s` runs out after 3), after `warmup` untimed rounds;
    returns the per-call milliseconds of each (same rounds, so slow phases of a busy machine hit all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def table_from_timings(medians: dict[int, tuple[float, float]], source: str) -> DispatchTable:
    """medians: {M: (kernel_ms, dense_ms)} at increasing M → rows up to the midpoint between measured Ms; the last
    measured M's decision covers every larger M."""
    ms = sorted(medians)
    rows: list[tuple[int, str]] = []
    for i, m in enumerate(ms):
        kernel_ms, dense_ms = medians[m]
        backend = "cpu" if kernel_ms <= MARGIN * dense_ms else "dense"
        upper = (m + ms[i + 1]) // 2 if i + 1 < len(ms) else 2**62
        if rows and rows[-1][1] == backend:
            rows[-1] = (upper, backend)
        else:
            rows.append((upper, backend))
    return DispatchTable(tuple(rows), source=source)


def calibrate_cpu_dispatch(kernel: Callable[[torch.Tensor], torch.Tensor], dense_weight: torch.Tensor, *, key: tuple,
                           tokens: tuple[int, ...] = CALIBRATION_TOKENS, reps: int = 15,
                           budget_s: float = 0.5) -> tuple[DispatchTable, dict]:
    """Measure `kernel(x)` against F.linear(x, dense_weight) for x [M, in] at each M in `tokens`.

    key: what makes two layers interchangeable for timing (shape, dtype, layout, sparsity); the result is cached
    under key + the thread count. Returns (table, {M: {"kernel_ms", "dense_ms"}}).
    """
    full_key = (*key, tuple(tokens), torch.get_num_threads())
    if full_key in _CACHE:
        return _CACHE[full_key]
    in_features = dense_weight.shape[1]
    medians: dict[int, tuple[float, float]] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, in_features, generator=gen).to(dense_weight.dtype)
            t = interleaved_median_ms({"kernel": lambda: kernel(x),
                                       "dense": lambda: torch.nn.functional.linear(x, dense_weight)},
                                      reps=reps, budget_s=budget_s / len(tokens))
            medians[m] = (statistics.median(t["kernel"]), statistics.median(t["dense"]))
    source = f"measured here ({torch.get_num_threads()} threads): " + ", ".join(
        f"M={m} {k:.3f}/{d:.3f} ms" for m, (k, d) in medians.items())
    result = (table_from_timings(medians, source),
              {m: {"kernel_ms": k, "dense_ms": d} for m, (k, d) in medians.items()})
    _CACHE[full_key] = result
    return result


def clear_calibration_cache() -> None:
    _CACHE.clear()
