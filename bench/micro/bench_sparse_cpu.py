"""CPU sparse linear kernels (2:4 and unstructured) and sparsefast's dense GEMV kernel against torch's dense F.linear
(MKL / oneDNN), same run.

Full run (writes bench/results/<date>-cpu-sparse-linear[-<tag>].json and PNG plots with the same stem; on a quiet
machine: other processes share the DRAM bandwidth being measured):
    python bench/micro/bench_sparse_cpu.py --models smollm2 --tag smollm2-2t --threads 2
Shapes: SmolLM2-135M and the LLaMA shapes (sparsefast.bench.shapes.CPU_MODELS).
Weight dtypes fp32, bf16 and int8 (per-row int8 + fp32 scales; its `dense` baseline is F.linear on the fp32 weight).
Per (shape, dtype, M): the medians of single calls of dense F.linear on the dense-with-zeros weight, the dense kernel
(`dense-kernel`, sparsefast.ops.dense_cpu) on the same weight, the 2:4 kernel and the unstructured kernel at each
sparsity, interleaved call by call (a busy machine slows all alike). Every variant cycles through enough copies of its
weight to move >= 4x the last-level cache per round, so each call reads its weight from DRAM as decode does. GB/s =
bytes of the weight format read per call / time; the copy bandwidth (read + write) is measured in the same run as the
roofline.

Under pytest (CI) the file runs in quick mode: tiny shapes, one call each, results to a temp dir; the timings mean
nothing there, the point is that the harness, the baselines and the JSON writer keep working.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsefast.bench.memory import copy_bandwidth_gbs, tensor_bytes
from sparsefast.bench.results import result_path, run_metadata
from sparsefast.bench.shapes import CPU_MODELS, QUICK_SHAPES, select_shapes
from sparsefast.checkpoint import write_json
from sparsefast.nn.dispatch import interleaved_median_ms, last_level_cache_bytes
from sparsefast.ops.dense_cpu import dense_linear_cpu
from sparsefast.ops.int8_rows import quantize_int8_rows
from sparsefast.ops.sparse24 import to_sparse24_by_magnitude
from sparsefast.ops.sparse24_cpu import pack_sparse24_cpu, sparse24_linear_cpu
from sparsefast.ops.sparse_unstructured import pack_sparse_unstructured, sparse_unstructured_linear_cpu

TOKENS = (1, 4, 8, 16, 64)
SPARSITIES = (0.5, 0.7, 0.9)
# weight dtypes; int8: per-row int8 with fp32 scales (sparsefast.ops.int8_rows) for the kernels, x and the dense
# F.linear baseline in fp32 (what a user runs the same layer with unquantized)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.int8 else dtype


def stored(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the weight as the kernels store it, its int8 scales or None)."""
    return quantize_int8_rows(w) if dtype == torch.int8 else (w.to(dtype), None)


class Rotating:
    """Calls fn(*args_i) on copy i, i = 0, 1, ... cyclically: each call sees a weight not in cache."""

    def __init__(self, make, size: int, min_bytes: int) -> None:
        first = make()
        self.copies = [first] + [tuple(t.clone() for t in first) for _ in range(max(0, -(-min_bytes // size) - 1))]
        self.i = 0

    def next(self) -> tuple[torch.Tensor, ...]:
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def variants(out_f: int, in_f: int, dtype: torch.dtype, sparsities, min_bytes: int, gen: torch.Generator):
    """{name: (bytes per call, sparsity, factory x -> thunk)} for dense, 2:4 and unstructured at each sparsity."""
    w24 = to_sparse24_by_magnitude(torch.randn(out_f, in_f, generator=gen))
    wd = w24.to(activation_dtype(dtype))
    q24, sc24 = stored(w24, dtype)
    out: dict[str, tuple] = {}
    dense = Rotating(lambda: (wd,), tensor_bytes(wd), min_bytes)
    out["dense"] = (tensor_bytes(wd), 0.0, lambda x: lambda: F.linear(x, *dense.next()))
    dense_k = Rotating(lambda: (q24.clone(),), tensor_bytes(q24), min_bytes)
    out["dense-kernel"] = (tensor_bytes(q24), 0.0,
                           lambda x: lambda: dense_linear_cpu(x, *dense_k.next(), scales=sc24))
    p24 = pack_sparse24_cpu(q24)
    r24 = Rotating(lambda: p24, tensor_bytes(*p24), min_bytes)
    out["2:4"] = (tensor_bytes(*p24), 0.5,
                  lambda x: lambda: sparse24_linear_cpu(x, *r24.next(), None, out_f, in_f, scales=sc24))
    for s in sparsities:
        w = torch.randn(out_f, in_f, generator=gen)
        w[torch.rand(w.shape, generator=gen) < s] = 0
        qu, scu = stored(w, dtype)
        pu = pack_sparse_unstructured(qu)
        ru = Rotating(lambda pu=pu: pu, tensor_bytes(*pu), min_bytes)
        out[f"unstructured-{s:g}"] = (tensor_bytes(*pu), s, lambda x, ru=ru, scu=scu: lambda: (
            sparse_unstructured_linear_cpu(x, *ru.next(), None, out_f, in_f, scales=scu)))
    return out


def measure_shape(shape, dtype_name: str, tokens, sparsities, reps: int, min_bytes: int, seed: int = 0) -> list[dict]:
    model, linear, out_f, in_f = shape
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    var = variants(out_f, in_f, dtype, sparsities, min_bytes, gen)
    rows = []
    for m in tokens:
        x = torch.randn(m, in_f, generator=gen).to(activation_dtype(dtype))
        times = interleaved_median_ms({name: make(x) for name, (_, _, make) in var.items()}, reps=reps)
        dense_ms = statistics.median(times["dense"])
        for name, (size, sparsity, _) in var.items():
            ms = statistics.median(times[name])
            rows.append({"model": model, "linear": linear, "out": out_f, "in": in_f, "dtype": dtype_name, "M": m,
                         "variant": name, "sparsity": sparsity, "median_ms": ms, "min_ms": min(times[name]),
                         "calls": len(times[name]), "weight_bytes": size, "gbs": size / (ms * 1e-3) / 1e9,
                         "speedup_vs_dense": dense_ms / ms})
    return rows


def plot(rows: list[dict], path_stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m in zip(axes, (1, 8)):
        for key in sorted({(r["model"], r["linear"], r["dtype"]) for r in rows}):
            sel = [r for r in rows if (r["model"], r["linear"], r["dtype"]) == key and r["M"] == m
                   and r["variant"].startswith("unstructured")]
            if sel:
                line, = ax.plot([r["sparsity"] for r in sel], [r["speedup_vs_dense"] for r in sel], marker="o",
                                label=" ".join(key))
                s24 = [r for r in rows if (r["model"], r["linear"], r["dtype"]) == key and r["M"] == m
                       and r["variant"] == "2:4"]
                ax.plot([0.5], [s24[0]["speedup_vs_dense"]], marker="*", ms=12, color=line.get_color())
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"M = {m} (star: 2:4)", xlabel="sparsity (unstructured)", ylabel="speedup over dense F.linear")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(path_stem.with_name(path_stem.name + "-vs-sparsity.png"))
    fig.savefig(paths[-1], dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, variant in zip(axes, ("2:4", "unstructured-0.5")):
        for key in sorted({(r["model"], r["linear"], r["dtype"]) for r in rows}):
            sel = [r for r in rows if (r["model"], r["linear"], r["dtype"]) == key and r["variant"] == variant]
            ax.plot([r["M"] for r in sel], [r["speedup_vs_dense"] for r in sel], marker="o", label=" ".join(key))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=variant, xlabel="tokens M", ylabel="speedup over dense F.linear", xscale="log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(path_stem.with_name(path_stem.name + "-vs-M.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2", help=f"comma list of {', '.join(CPU_MODELS)}")
    ap.add_argument("--linears", default="", help="comma list of linear names to keep (default: all)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=15, help="timed calls per variant and M")
    ap.add_argument("--tag", default="", help="suffix of the JSON/PNG names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = select_shapes(args.models, CPU_MODELS)
    if args.linears:
        shapes = [s for s in shapes if s[1] in args.linears.split(",")]
    tokens = tuple(int(t) for t in args.tokens.split(","))
    copy_gbs = copy_bandwidth_gbs("cpu")
    min_bytes = 4 * last_level_cache_bytes()
    rows = []
    for shape in shapes:
        for dt in args.dtypes.split(","):
            rows += measure_shape(shape, dt, tokens, SPARSITIES, args.reps, min_bytes)
            print(f"{shape} {dt}: " + ", ".join(f"M={r['M']} {r['variant']} {r['speedup_vs_dense']:.2f}x"
                                                for r in rows[-len(tokens) * (3 + len(SPARSITIES)):]
                                                if r["variant"] in ("dense-kernel", "2:4", "unstructured-0.5")),
                  flush=True)
    path = result_path("sparse-linear" + (f"-{args.tag}" if args.tag else ""), device="cpu")
    stem = path.with_suffix("")
    payload = {"what": "cpu sparse linear kernels and the dense kernel vs dense F.linear",
               "metadata": run_metadata("cpu"),
               "threads": torch.get_num_threads(), "copy_bandwidth_gbs": copy_gbs,
               "isa": int(torch.ops.sparsefast.cpu_best_isa()), "reps": args.reps, "min_bytes_per_round":
               min_bytes, "rows": rows}
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload["plots"] = [p.name for p in plot(rows, stem)]
    write_json(path, payload)
    print(f"wrote {path}, copy bandwidth {copy_gbs:.1f} GB/s")
    return 0


@pytest.mark.parametrize("shape", QUICK_SHAPES, ids=lambda s: f"{s[2]}x{s[3]}")
def test_bench_sparse_cpu_quick(benchmark, shape, results, quick):
    """CI: the harness on tiny shapes (one call per variant); real numbers come from main() above."""
    rows = measure_shape(shape, "fp32", (1, 3), (0.7,), reps=1, min_bytes=0)
    assert {r["variant"] for r in rows} == {"dense", "dense-kernel", "2:4", "unstructured-0.7"}
    int8 = measure_shape(shape, "int8", (1,), (0.5,), reps=1, min_bytes=0)
    assert {r["variant"] for r in int8} == {"dense", "dense-kernel", "2:4", "unstructured-0.5"}
    gen = torch.Generator().manual_seed(1)
    var = variants(shape[2], shape[3], torch.float32, (0.7,), 0, gen)
    benchmark(var["2:4"][2](torch.randn(1, shape[3], generator=gen)))
    results.setdefault("cpu-sparse-linear-quick", []).extend(rows)


if __name__ == "__main__":
    raise SystemExit(main())
