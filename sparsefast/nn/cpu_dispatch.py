"""Which path a sparse linear takes on the CPU, by number of tokens M: measured on the machine that runs it.

A CPU's balance of memory bandwidth and vector throughput varies between machines (and with threads), so there is no
table to ship: `calibrate_cpu_dispatch` times, on this machine and at the current torch thread count, the layer's
packed weight with the sparse kernel against torch's dense F.linear on the dense-with-zeros weight, at
CALIBRATION_TOKENS, interleaving the two (the same conditions for both) and taking medians. A token bucket uses the
kernel only when its median beats dense by MARGIN; otherwise that bucket runs dense, so a swapped layer is never
slower than dense by more than the timing noise, by design. Results are cached per (shape, dtype, layout, sparsity
to 2 decimals, threads) for the life of the process: one calibration serves every layer of that shape (a SmolLM2-135M
swap calibrates 4 shapes x its layouts in a few seconds).

Both candidates are timed with their weight read from DRAM, not from cache, because that is the regime of batch-1
decode: a token reads every weight of the model once (SmolLM2-135M in fp32 is 538 MB, against an L3 of 32 MB), so by
the time a layer runs again its weight has long left the cache. Timing one weight copy in a loop measures the
cache-hot regime instead, which picks the wrong path: on a 2-core AMD EPYC (32 MB L3; ad-hoc timings with the
kernels of 2026-12-02), a 576x576 fp32 layer at M=1
took 0.030 ms dense vs 0.045 ms with the kernel cache-hot (dense chosen), while from DRAM the kernel is 1.4-1.9x
faster than dense per layer; the hot calibration left most layers of a swapped SmolLM2 dense at M=1 and decode
gained nothing. So each candidate rotates through distinct copies of its weight (clones of the dense weight for
dense, fresh packed copies for the kernel), together at least COLD_FOOTPRINT_LLC x the last-level cache
(`last_level_cache_bytes`), at most COLD_MAX_BYTES (and at least 2 copies), one rotation continuing across all M: each
timed call reads a copy that the calls since its last use have evicted. The copies live only during the calibration.
The timing rounds stop once `budget_s` is spent (at least 3 per M); making the copies costs one pass of clone writes
over at most COLD_MAX_BYTES per candidate (2 copies where one is larger than half of it). Where the cap binds (an LLC
over COLD_MAX_BYTES / COLD_FOOTPRINT_LLC), part of the reads hit the cache and the timings lean towards dense.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sparsefast.nn.sparse24_linear import DispatchTable

CALIBRATION_TOKENS = (1, 4, 16, 64)
MARGIN = 0.95  # the kernel must take at most 95% of dense's median time to be chosen
RUN_CALLS = 4  # consecutive calls of one candidate per timed run
DEFAULT_CPU_DISPATCH = DispatchTable(((64, "cpu"), (2**62, "dense")),
                                     source="default (unmeasured): CPU kernels for M <= 64")
LLC_FALLBACK_BYTES = 64 << 20  # where sysfs does not tell the last-level cache size
COLD_FOOTPRINT_LLC = 2  # each candidate's copies together hold at least this many LLCs ...
COLD_MAX_BYTES = 256 << 20  # ... but at most this many bytes (and at least 2 copies, whatever their size)
CPU0_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
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


def _cache_size_bytes(text: str) -> int:
    """sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes(cache_dir: Path = CPU0_CACHE) -> int:
    """Size of cpu0's level-3 cache (else of its highest-level data / unified cache), read from sysfs
    (cache_dir/index*/{level,type,size}); LLC_FALLBACK_BYTES where that cannot be read."""
    sizes: dict[int, int] = {}
    for index in cache_dir.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            sizes[level] = max(sizes.get(level, 0), _cache_size_bytes((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    sizes = {lv: s for lv, s in sizes.items() if s > 0}
    if not sizes:
        return LLC_FALLBACK_BYTES
    return sizes.get(3) or sizes[max(sizes)]


def cold_copies(copy_bytes: int, llc_bytes: int) -> int:
    """How many distinct copies of a `copy_bytes` weight to rotate through so that each call reads it from DRAM:
    together >= COLD_FOOTPRINT_LLC x llc_bytes, but at most COLD_MAX_BYTES, and at least 2."""
    copy_bytes = max(copy_bytes, 1)
    want = -(-COLD_FOOTPRINT_LLC * llc_bytes // copy_bytes)
    return max(2, min(want, COLD_MAX_BYTES // copy_bytes))


def _cold_medians(kernel_copy: Callable[[], Callable[[torch.Tensor], torch.Tensor]], kernel_bytes: int,
                  dense_weight: torch.Tensor, llc: int, tokens: tuple[int, ...], reps: int,
                  budget_s: float) -> tuple[dict[int, tuple[float, float]], int, int]:
    """{M: (kernel_ms, dense_ms)} medians, each call on the next of the rotating copies; the copies are made here
    and freed on return. Also returns the number of packed and of dense copies."""
    n_dense = cold_copies(dense_weight.numel() * dense_weight.element_size(), llc)
    n_kernel = cold_copies(kernel_bytes, llc)
    # Made in this order, each copy's first timed use comes after more than an LLC of other copies were written.
    dense_weights = [dense_weight] + [dense_weight.clone() for _ in range(n_dense - 1)]
    kernels = [kernel_copy() for _ in range(n_kernel)]
    # One rotation each across all M, so a copy is used again only after all the others of both candidates.
    next_dense, next_kernel = itertools.cycle(dense_weights).__next__, itertools.cycle(kernels).__next__
    linear = torch.nn.functional.linear
    in_features = dense_weight.shape[1]
    medians: dict[int, tuple[float, float]] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, in_features, generator=gen).to(dense_weight.dtype)
            # Runs of RUN_CALLS consecutive calls per candidate, alternating: in a decode step a swapped layer's
            # neighbours are mostly swapped layers too, so each candidate is timed after calls of its own kind.
            t = interleaved_median_ms(
                {"kernel": lambda: [next_kernel()(x) for _ in range(RUN_CALLS)],
                 "dense": lambda: [linear(x, next_dense()) for _ in range(RUN_CALLS)]},
                reps=reps, budget_s=budget_s / len(tokens))
            medians[m] = (statistics.median(t["kernel"]) / RUN_CALLS, statistics.median(t["dense"]) / RUN_CALLS)
    return medians, n_kernel, n_dense


def calibrate_cpu_dispatch(kernel_copy: Callable[[], Callable[[torch.Tensor], torch.Tensor]], kernel_bytes: int,
                           dense_weight: torch.Tensor, *, key: tuple, tokens: tuple[int, ...] = CALIBRATION_TOKENS,
                           reps: int = 15, budget_s: float = 0.5) -> tuple[DispatchTable, dict]:
    """Measure the sparse kernel against F.linear(x, dense_weight) for x [M, in] at each M in `tokens`, both with
    their weights read from DRAM (see the module docstring).

    kernel_copy: called once per packed copy (only on a cache miss); each call must pack or clone a NEW copy of the
    layer's packed weight and return the kernel over it, `x -> y`. kernel_bytes: the bytes of one packed copy.
    dense_weight: [out, in], the dense-with-zeros weight; it is one of the dense copies, the others are its clones.
    key: what makes two layers interchangeable for timing (shape, dtype, layout, sparsity); the result is cached
    under key + the thread count. budget_s bounds the timing rounds (at least 3 per M). Returns
    (table, {M: {"kernel_ms", "dense_ms"}}); the copies are dropped before it returns.
    """
    threads = torch.get_num_threads()
    full_key = (*key, tuple(tokens), threads)
    if full_key in _CACHE:
        return _CACHE[full_key]
    llc = last_level_cache_bytes()
    medians, n_kernel, n_dense = _cold_medians(kernel_copy, kernel_bytes, dense_weight, llc, tokens, reps, budget_s)
    source = (f"measured here ({threads} threads, weights from DRAM: {n_kernel} packed / {n_dense} dense copies, "
              f"LLC {llc / 2**20:g} MiB): " + ", ".join(f"M={m} {k:.3f}/{d:.3f} ms" for m, (k, d) in medians.items()))
    result = (table_from_timings(medians, source),
              {m: {"kernel_ms": k, "dense_ms": d} for m, (k, d) in medians.items()})
    _CACHE[full_key] = result
    return result


def clear_calibration_cache() -> None:
    _CACHE.clear()
