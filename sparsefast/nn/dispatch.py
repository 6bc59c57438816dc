"""Which kernel runs a sparse linear: the one place that decides it, for both module classes of sparsefast.nn.

A decision is a `DispatchTable` of (max_tokens, backend) rows, first match wins, applied to the number of tokens M of
each input x [..., in] (every leading dim flattened) by `sparse24_backend_for` (Sparse24Linear on CUDA inputs) and
`cpu_backend_for` (SparseLinear, and Sparse24Linear on CPU inputs). The modules then call the kernels' entry points
directly (`sparsefast.ops.sparse24.sparse24_matmul_cuda`, the registered `torch.ops.sparsefast.*_cpu` ops): the
functional ops' own `backend=` selection (sparsefast.ops._dispatch) is for their direct users and never runs a second
time on this path. Backends:

* ``cuda``: sparsefast's 2:4 CUDA kernels (the op's kernel="auto": decode kernel for small M, mma.sp GEMM above);
* ``semi_structured``: torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS) on the unpacked weight;
* ``cpu``: sparsefast's CPU kernels (sparsefast.ops.sparse24_cpu, sparsefast.ops.sparse_unstructured);
* ``dense``: the dense route on the dense-with-zeros weight (sparsefast.ops.dense_cpu.dense_layer_route: the dense CPU
  kernel for few tokens, on the int8 values of an int8-quantized layer, else F.linear; inputs no sparse kernel takes,
  and the safe fallback).

CUDA tables are measured per GPU family and shipped: sparsefast/nn/dispatch_tables/<family>.json, chosen by CUDA
device name (h100, h200), written from the `*-sparse24-dispatch.json` of bench/micro/bench_sparse24_matmul.py. The table
of a Sparse24Linear, first match wins: its `dispatch=`; the file named by $SPARSEFAST_SPARSE24_TABLE; the shipped table
of the input's device family; else DEFAULT_DISPATCH, the custom kernels for every M (the only path that reads the
packed weight without materialising a dense or cuSPARSELt copy, so it never costs extra memory). It is chosen at the
first CUDA forward, so a layer built on the CPU and moved to the GPU gets its GPU's table.

CPU tables are measured on the machine that runs them: a CPU's balance of memory bandwidth and vector throughput varies
between machines (and with threads), so there is no table to ship. `calibrate_cpu_dispatch` times, on this machine and
at the current torch thread count, the layer's packed weight with the sparse kernel against the dense route
(`dense_layer_route`: the dense CPU kernel up to DENSE_KERNEL_MAX_TOKENS, F.linear above; for an int8 layer the int8
kernel on its q, the layer's dense baseline) on the dense-with-zeros weight, at
CALIBRATION_TOKENS, interleaving the two (the same conditions for both) and taking medians. A token bucket uses the
kernel only when its median beats dense by MARGIN; otherwise that bucket runs dense, so a swapped layer is never slower
than dense by more than the timing noise, by design. Results are cached per (shape, dtype, layout, sparsity to 2
decimals, threads) for the life of the process: one calibration serves every layer of that shape. `fastest_cpu_layout`
then picks a layer's layout (2:4 / unstructured / none: stay dense).

Both candidates are timed with their weight read from DRAM, not from cache, because that is the regime of batch-1
decode: a token reads every weight of the model once (SmolLM2-135M in fp32 is 538 MB, against an L3 of tens of MB),
so by the time a layer runs again its weight has long left the cache. Timing one weight copy in a loop measures the
cache-hot regime instead, which picks the wrong path: cache-hot, dense F.linear beat the kernel at M=1 on SmolLM2's
small layers when this was designed, while from DRAM the kernel, reading about half the bytes, is faster than dense
(bench/results/2026-12-03-cpu-sparse-linear-smollm2-2t.json, every weight read from DRAM); a hot calibration left most
layers of a swapped SmolLM2 dense at M=1 and decode gained nothing. So each candidate rotates through distinct copies
of its weight (clones of the dense weight for dense, fresh packed copies for the kernel), together at least
COLD_FOOTPRINT_LLC x the last-level cache (`last_level_cache_bytes`), at most COLD_MAX_BYTES (and at least 2 copies),
one rotation continuing across all M: each timed call reads a copy that the calls since its last use have evicted.
The copies live only during the calibration. The timing rounds stop once `budget_s` is spent (at least 3 per M);
making the copies costs one pass of clone writes over at most COLD_MAX_BYTES per candidate (2 copies where one is
larger than half of it). Where the cap binds (an LLC over COLD_MAX_BYTES / COLD_FOOTPRINT_LLC), part of the reads hit
the cache and the timings lean towards dense.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sparsefast._ext import load_cpu_extension, load_extension
from sparsefast.ops.dense_cpu import dense_layer_route
from sparsefast.ops.int8_rows import quantize_int8_rows
from sparsefast.ops.sparse24 import cuda_supported
from sparsefast.ops.sparse24_cpu import kernel_supported

TABLE_BACKENDS = ("cuda", "semi_structured", "dense", "cpu")
TABLE_ENV = "SPARSEFAST_SPARSE24_TABLE"
SHIPPED_TABLES = Path(__file__).resolve().parent / "dispatch_tables"
DEVICE_FAMILIES = (("H100", "h100"), ("H200", "h200"))  # substring of torch.cuda.get_device_name -> table file
CALIBRATION_TOKENS = (1, 4, 16, 64)
MARGIN = 0.95  # the kernel must take at most 95% of dense's median time to be chosen
RUN_CALLS = 4  # consecutive calls of one candidate per timed run
LLC_FALLBACK_BYTES = 64 << 20  # where sysfs does not tell the last-level cache size
COLD_FOOTPRINT_LLC = 2  # each candidate's copies together hold at least this many LLCs ...
COLD_MAX_BYTES = 256 << 20  # ... but at most this many bytes (and at least 2 copies, whatever their size)
CPU0_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class DispatchTable:
    """rows: ((max_tokens, backend), ...) in increasing max_tokens; the first row with M <= max_tokens wins."""

    rows: tuple[tuple[int, str], ...]
    source: str = "default"

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("DispatchTable: needs at least one (max_tokens, backend) row")
        last = 0
        for max_m, backend in self.rows:
            if backend not in TABLE_BACKENDS:
                raise ValueError(f"DispatchTable: unknown backend {backend!r}; choose one of "
                                 f"{', '.join(TABLE_BACKENDS)}")
            if max_m <= last:
                raise ValueError(f"DispatchTable: max_tokens must increase, got {[r[0] for r in self.rows]}")
            last = max_m

    def backend_for(self, tokens: int) -> str:
        for max_m, backend in self.rows:
            if tokens <= max_m:
                return backend
        return self.rows[-1][1]


DEFAULT_DISPATCH = DispatchTable(((2**62, "cuda"),), source="default (unmeasured): sparsefast kernels for every M")
DEFAULT_CPU_DISPATCH = DispatchTable(((64, "cpu"), (2**62, "dense")),
                                     source="default (unmeasured): CPU kernels for M <= 64")
_CPU_CALIBRATIONS: dict[tuple, tuple[DispatchTable, dict]] = {}


def load_dispatch_table(path: str | os.PathLike) -> DispatchTable:
    """Read {"rows": [[max_tokens, backend], ...], ...} as written by bench_sparse24_matmul.py."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sparse24 dispatch table {path} not found; run bench/micro/bench_sparse24_matmul.py")
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON object with a 'rows' list of [max_tokens, backend]")
    return DispatchTable(tuple((int(m), str(b)) for m, b in rows), source=str(path))


def device_family(device_name: str) -> str | None:
    """The shipped-table family of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100"), None if none matches."""
    for key, family in DEVICE_FAMILIES:
        if key in device_name:
            return family
    return None


@functools.lru_cache(maxsize=None)
def _shipped_table(family: str) -> DispatchTable | None:
    path = SHIPPED_TABLES / f"{family}.json"
    return load_dispatch_table(path) if path.is_file() else None


def default_dispatch(device: torch.device | None = None) -> DispatchTable:
    """The table of a Sparse24Linear without an explicit one: $SPARSEFAST_SPARSE24_TABLE, else the table shipped for
    `device`'s family (a CUDA device), else DEFAULT_DISPATCH."""
    path = os.environ.get(TABLE_ENV)
    if path:
        return load_dispatch_table(path)
    if device is not None and device.type == "cuda":
        family = device_family(torch.cuda.get_device_name(device))
        table = _shipped_table(family) if family else None
        if table is not None:
            return table
    return DEFAULT_DISPATCH


def tokens_of(x: torch.Tensor) -> int:
    """M: the number of tokens of x [..., in] (every leading dim flattened)."""
    return x.numel() // max(x.shape[-1], 1)


def cpu_backend_for(table: DispatchTable, x: torch.Tensor, values: torch.Tensor,
                    int8_activations: bool = False) -> str:
    """"cpu" or "dense" for x [..., in] on a weight packed for the CPU kernels as `values`: the kernel where `table`
    says so at M and the kernels take the case (CPU tensors, fp32/bf16, int8 activations where their kernels run,
    the CPU extension loaded)."""
    if not kernel_supported(x, values, int8_activations) or not load_cpu_extension():
        return "dense"
    return "cpu" if table.backend_for(tokens_of(x)) == "cpu" else "dense"


def sparse24_backend_for(table: DispatchTable, x: torch.Tensor, values: torch.Tensor, in_features: int,
                         semi_structured_weight: Callable[[], torch.Tensor | None]) -> str:
    """"cuda", "semi_structured" or "dense" for a CUDA input x [..., in_features] on the CUDA 2:4 layout `values`:
    `table`'s choice at M where it can run, else the next best: our kernels need the extension (a build without CUDA
    has none) and a case they take; torch's semi-structured path needs a weight torch can convert
    (semi_structured_weight() is None otherwise; it is only called when that path is considered)."""
    preference = {"cuda": ("cuda", "semi_structured"), "semi_structured": ("semi_structured", "cuda")}
    for backend in preference.get(table.backend_for(tokens_of(x)), ()):  # a "cpu" row means nothing on CUDA
        if backend == "cuda" and cuda_supported(x, values, in_features) and load_extension() is not None:
            return "cuda"
        if backend == "semi_structured" and semi_structured_weight() is not None:
            return "semi_structured"
    return "dense"


def fastest_cpu_layout(measured: dict[str, tuple[DispatchTable, dict]]) -> str | None:
    """The layout (a key of `measured`: {layout: calibrate_cpu_dispatch's (table, timings)}) whose kernel wins at some
    calibrated M with the least Σ_M min(kernel_ms, dense_ms); None when no layout beats dense anywhere (stay dense).
    Ties go to the first layout."""
    best: tuple[float, str] | None = None
    for layout, (table, timings) in measured.items():
        total = sum(min(t["kernel_ms"], t["dense_ms"]) for t in timings.values())
        if any(b == "cpu" for _, b in table.rows) and (best is None or total < best[0]):
            best = (total, layout)
    return None if best is None else best[1]


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
                  budget_s: float, dense_scales: torch.Tensor | None = None, int8_activations: bool = False
                  ) -> tuple[dict[int, tuple[float, float]], int, int]:
    """{M: (kernel_ms, dense_ms)} medians, each call on the next of the rotating copies; the copies are made here
    and freed on return. Also returns the number of packed and of dense copies. dense_scales: an int8 layer's
    scales; its dense copies then hold the int8 q too (dense_layer_route, with `int8_activations`)."""
    q = None if dense_scales is None else quantize_int8_rows(dense_weight, dense_scales)[0]
    dense_bytes = dense_weight.numel() * dense_weight.element_size() + (0 if q is None else q.numel())
    n_dense = cold_copies(dense_bytes, llc)
    n_kernel = cold_copies(kernel_bytes, llc)
    # Made in this order, each copy's first timed use comes after more than an LLC of other copies were written.
    dense_weights = [(dense_weight, q)] + [(dense_weight.clone(), None if q is None else q.clone())
                                           for _ in range(n_dense - 1)]
    kernels = [kernel_copy() for _ in range(n_kernel)]
    # One rotation each across all M, so a copy is used again only after all the others of both candidates.
    next_dense, next_kernel = itertools.cycle(dense_weights).__next__, itertools.cycle(kernels).__next__
    in_features = dense_weight.shape[1]

    def dense_call(x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return dense_layer_route(x, weight, q, dense_scales, int8_activations)(x, weight, None)

    medians: dict[int, tuple[float, float]] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, in_features, generator=gen).to(dense_weight.dtype)
            # Runs of RUN_CALLS consecutive calls per candidate, alternating: in a decode step a swapped layer's
            # neighbours are mostly swapped layers too, so each candidate is timed after calls of its own kind.
            t = interleaved_median_ms(
                {"kernel": lambda: [next_kernel()(x) for _ in range(RUN_CALLS)],
                 "dense": lambda: [dense_call(x, *next_dense()) for _ in range(RUN_CALLS)]},
                reps=reps, budget_s=budget_s / len(tokens))
            medians[m] = (statistics.median(t["kernel"]) / RUN_CALLS, statistics.median(t["dense"]) / RUN_CALLS)
    return medians, n_kernel, n_dense


def calibrate_cpu_dispatch(kernel_copy: Callable[[], Callable[[torch.Tensor], torch.Tensor]], kernel_bytes: int,
                           dense_weight: torch.Tensor, *, key: tuple, tokens: tuple[int, ...] = CALIBRATION_TOKENS,
                           reps: int = 15, budget_s: float = 0.5,
                           dense_scales: torch.Tensor | None = None,
                           int8_activations: bool = False) -> tuple[DispatchTable, dict]:
    """Measure the sparse kernel against the dense route of dense_weight for x [M, in] at each M in `tokens`, both with
    their weights read from DRAM (see the module docstring).

    kernel_copy: called once per packed copy (only on a cache miss); each call must pack or clone a NEW copy of the
    layer's packed weight and return the kernel over it, `x -> y`. kernel_bytes: the bytes of one packed copy.
    dense_weight: [out, in], the dense-with-zeros weight; it is one of the dense copies, the others are its clones.
    dense_scales: an int8-quantized layer's per-row scales: dense is then the dense route such a layer runs
    (sparsefast.ops.dense_cpu.dense_layer_route: the int8 kernel on q for few tokens), not the float one;
    int8_activations: that layer's dense route with x quantized to int8 (kernel_copy's kernel must match).
    key: what makes two layers interchangeable for timing (shape, dtype, layout, sparsity); the result is cached
    under key + the thread count. budget_s bounds the timing rounds (at least 3 per M). Returns
    (table, {M: {"kernel_ms", "dense_ms"}}); the copies are dropped before it returns.
    """
    threads = torch.get_num_threads()
    full_key = (*key, tuple(tokens), threads)
    if full_key in _CPU_CALIBRATIONS:
        return _CPU_CALIBRATIONS[full_key]
    llc = last_level_cache_bytes()
    medians, n_kernel, n_dense = _cold_medians(kernel_copy, kernel_bytes, dense_weight, llc, tokens, reps, budget_s,
                                               dense_scales, int8_activations)
    source = (f"measured here ({threads} threads, weights from DRAM: {n_kernel} packed / {n_dense} dense copies, "
              f"LLC {llc / 2**20:g} MiB): " + ", ".join(f"M={m} {k:.3f}/{d:.3f} ms" for m, (k, d) in medians.items()))
    result = (table_from_timings(medians, source),
              {m: {"kernel_ms": k, "dense_ms": d} for m, (k, d) in medians.items()})
    _CPU_CALIBRATIONS[full_key] = result
    return result


def clear_calibration_cache() -> None:
    """Forget every CPU calibration of this process (the next swap times its layers again)."""
    _CPU_CALIBRATIONS.clear()
