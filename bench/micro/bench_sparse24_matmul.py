"""Benchmark of the 2:4 kernels vs cuBLAS dense (torch F.linear) and torch's semi-structured path, same run.

For every LLaMA layer shape (sparsefast.bench.shapes) and M tokens: median time, dense-equivalent TFLOP/s (2·M·N·K),
GB/s over the bytes each path must move (weight + x + y; the packed weight is 0.5625 of the dense bytes), speedup vs
dense.

How it is timed (sparsefast.bench.timing.time_ms). Eagerly, torch's semi-structured path is dominated by host work,
cuSPARSELt's per-call plan set-up, not its kernel, and a first row timed before the GPU has clocked up reads slow
(compare `ms` and `ms_eager` in bench/results/2026-11-23-h100-sparse24-matmul.json), hence:
* a global warm-up (~0.5 s of large matmuls) and three untimed calls of every function before its timing;
* every function is timed twice with triton's do_bench (median, L2 flushed before each call): `ms_eager` calls it
  from Python; `ms` replays a CUDA graph of one call, i.e. device time without host overhead. `ms` is the
  comparison of kernels (all backends alike); `ms_eager` is what an eager module pays and drives the dispatch table.
* torch semi-structured: the weight is converted once, outside the timed region, by every backend torch has here
  (cuSPARSELt; CUTLASS via SparseSemiStructuredTensor._FORCE_CUTLASS; on sm_90 torch's CUTLASS kernels refuse to
  run and the error is recorded), in the call forms torch documents: F.linear(x, W_semi) and torch.mm(W_semi, xᵀ)
  with the sparse operand first (xᵀ made contiguous outside the timing), plus cuSPARSELt with the algorithm id from
  torch._cslt_sparse_mm_search. "semi_structured" is the fastest of these; every raw number stays in the JSON.
* ours: "cuda" = the auto choice (decode kernel for M <= 8, GEMM v2 above), plus "cuda_gemm_v1" (the first GEMM,
  the A/B baseline, through the raw registered op: it is not a choice of the public function), "cuda_gemm" (v2
  where auto picked decode) and "cuda_decode" (decode where auto picked v2, M <= 32).
Writes <date>-<device>-sparse24-matmul.json and the Sparse24Linear dispatch table <date>-<device>-sparse24-dispatch.json
(best eager backend per M, geometric mean over fp16 shapes) to --out (default bench/results/).
Run: python bench/micro/bench_sparse24_matmul.py [--quick] [--bf16] [--budget-s S] [--models llama-7b,...]
[--m-list 1,16,2048]. `--dry-run` (no CUDA needed) runs the same harness on two tiny shapes on the CPU, with the torch
twin standing in for the CUDA kernels, so the GPU script cannot fail on a typo; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from sparsefast.bench.results import result_path, results_dir, run_metadata
from sparsefast.bench.shapes import select_shapes
from sparsefast.bench.timing import time_ms, warm_up_gpu
from sparsefast.checkpoint import write_json

M_LIST = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096]
BACKENDS = ("dense", "semi_structured", "cuda")
WARMUP_MS, REP_MS = 5, 25
DRY_RUN_SHAPES = [("tiny", "odd", 40, 96), ("tiny", "wide", 24, 256)]


def _semi_variants(w: torch.Tensor) -> tuple[dict, dict]:
    """{name: (w_semi, kind)} for every semi-structured backend that converts this weight; {name: error}."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    out, errors = {}, {}
    for name, force in (("cslt", False), ("cutlass", True)):
        old = SparseSemiStructuredTensor._FORCE_CUTLASS
        try:
            SparseSemiStructuredTensor._FORCE_CUTLASS = force
            ws = to_sparse_semi_structured(w)
            out[name] = ws
        except Exception as exc:  # recorded in the JSON, not fatal
            errors[f"semi_{name}"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = old
    if "cslt" in out and type(out["cslt"]).__name__.endswith("CUTLASS"):  # no cuSPARSELt in this torch
        out.pop("cslt")
    return out, errors


def _semi_fns(variants: dict, x: torch.Tensor) -> dict:
    fns = {}
    xt = x.t().contiguous()
    for name, ws in variants.items():
        fns[f"semi_{name}_linear"] = lambda ws=ws: torch.nn.functional.linear(x, ws)
        fns[f"semi_{name}_mm"] = lambda ws=ws: torch.mm(ws, xt)
    if "cslt" in variants and hasattr(torch, "_cslt_sparse_mm_search"):
        packed = variants["cslt"].packed
        try:
            alg = int(torch._cslt_sparse_mm_search(packed, xt))
            fns[f"semi_cslt_alg{alg}"] = lambda: torch._cslt_sparse_mm(packed, xt, alg_id=alg)
        except Exception:  # no search for this shape (e.g. a single column): the other forms stand
            pass
    return fns


def bench_shape(n: int, k: int, ms: list[int], dtype: torch.dtype) -> list[dict]:
    from sparsefast.ops.sparse24 import DECODE_MAX_M, pack_sparse24, sparse24_matmul, to_sparse24_by_magnitude

    dry = not torch.cuda.is_available()  # the dry run: the torch twin stands in for the kernels
    dev = "cpu" if dry else "cuda"
    w = to_sparse24_by_magnitude(torch.randn(n, k, device=dev) * k**-0.5).to(dtype)
    values, meta = pack_sparse24(w)
    variants, semi_errors = ({}, {}) if dry else _semi_variants(w)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=dtype)
        fns = {"dense": lambda: torch.nn.functional.linear(x, w),
               "cuda": lambda: sparse24_matmul(x, values, meta, n, k, backend="torch" if dry else "cuda")}
        if not dry:  # the individual CUDA kernels, A/B against the auto choice
            if m > 4:  # the A/B baseline: the first GEMM, kernel code 2 of the raw registered op (x is [M, in])
                fns["cuda_gemm_v1"] = lambda: torch.ops.sparsefast.sparse24_matmul(x, values, meta, n, k, 2)
            if m <= 8:
                fns["cuda_gemm"] = lambda: sparse24_matmul(x, values, meta, n, k, backend="cuda", kernel="gemm")
            elif m <= DECODE_MAX_M:
                fns["cuda_decode"] = lambda: sparse24_matmul(x, values, meta, n, k, backend="cuda", kernel="decode")
            fns.update(_semi_fns(variants, x))
        row = {"M": m, "N": n, "K": k, "dtype": str(dtype).replace("torch.", ""), "ms": {}, "ms_eager": {},
               "errors": dict(semi_errors)}
        for name, fn in fns.items():
            for graph, key in ((True, "ms"), (False, "ms_eager")):
                try:
                    row[key][name] = time_ms(fn, warmup_ms=WARMUP_MS, rep_ms=REP_MS, cuda_graph=graph,
                                             untimed_calls=3, cpu_calls=5)
                except Exception as exc:
                    row["errors"][f"{name}{'' if graph else '_eager'}"] = f"{type(exc).__name__}: {exc}"[:300]
        for key in ("ms", "ms_eager"):
            semi = {b: t for b, t in row[key].items() if b.startswith("semi_")}
            if semi:
                best = min(semi, key=semi.get)
                row[key]["semi_structured"] = semi[best]
                row[f"semi_structured_best{'' if key == 'ms' else '_eager'}"] = best
        flops = 2.0 * m * n * k
        io = 2.0 * (m * k + m * n)
        row["tflops"] = {b: flops / (t * 1e-3) / 1e12 for b, t in row["ms"].items()}
        row["gbps"] = {b: ((2.0 if b == "dense" else 1.125) * n * k + io) / (t * 1e-3) / 1e9
                       for b, t in row["ms"].items()}
        if "dense" in row["ms"]:
            row["speedup_vs_dense"] = {b: row["ms"]["dense"] / t for b, t in row["ms"].items()}
        rows.append(row)
    return rows


def dispatch_rows(results: list[dict], ms: list[int]) -> list[list]:
    """Best eager backend per M (geometric mean of time over shapes), merged into [max_tokens, backend] rows.
    Eager, because Sparse24Linear calls its backend eagerly: cuSPARSELt's per-call host set-up is part of its cost."""
    best = []
    for m in ms:
        scores = {}
        for b in BACKENDS:
            ts = [r["ms_eager"][b] for r in results if r["M"] == m and b in r["ms_eager"]]
            if len(ts) == len([r for r in results if r["M"] == m]) and ts:
                scores[b] = math.exp(sum(math.log(t) for t in ts) / len(ts))
        best.append(min(scores, key=scores.get) if scores else "dense")
    rows: list[list] = []
    for m, b in zip(ms, best):
        if rows and rows[-1][1] == b:
            rows[-1][0] = m
        else:
            rows.append([m, b])
    rows[-1][0] = 2**62
    return rows


def print_table(results: list[dict]) -> None:
    """The summary table of the run, printed at its end."""
    print(f"{'shape (device ms: CUDA-graph replay)':34s} {'M':>5s} {'dense':>8s} {'ours':>8s} {'decode':>8s} "
          f"{'gemm_v1':>8s} {'gemm_v2':>8s} {'semi':>8s} {'semi_eag':>8s} {'x dense':>7s} {'x semi':>6s} "
          f"{'GB/s':>6s} {'TFLOP/s':>7s}  semi best")
    nan = float("nan")
    for r in results:
        t, te = r["ms"], r["ms_eager"]
        name = f"{r['model']}-{r['linear']}-{r['dtype'][:4]}"
        if "cuda" not in t:
            print(f"{name:34s} {r['M']:5d} errors {r['errors']}")
            continue
        v2 = t.get("cuda_gemm", t["cuda"] if r["M"] > 8 else nan)
        dec = t.get("cuda_decode", t["cuda"] if r["M"] <= 8 else nan)
        semi = t.get("semi_structured", nan)
        print(f"{name:34s} {r['M']:5d} {t.get('dense', nan):8.4f} {t['cuda']:8.4f} {dec:8.4f} "
              f"{t.get('cuda_gemm_v1', nan):8.4f} {v2:8.4f} {semi:8.4f} {te.get('semi_structured', nan):8.4f} "
              f"{t.get('dense', nan) / t['cuda']:7.2f} "
              f"{semi / t['cuda']:6.2f} {r['gbps']['cuda']:6.0f} {r['tflops']['cuda']:7.1f}  "
              f"{r.get('semi_structured_best', '-')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="result directory (default bench/results/)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values")
    ap.add_argument("--bf16", action="store_true", help="also bf16 (llama-7b shapes)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    ap.add_argument("--models", default=None, help="comma list of sparsefast.bench.shapes models (default: all)")
    ap.add_argument("--m-list", default=None, help="comma list of token counts M (default: %s)" % M_LIST)
    ap.add_argument("--dry-run", action="store_true", help="no CUDA: tiny shapes on the CPU, torch twin for ours")
    args = ap.parse_args(argv)
    try:
        m_arg = [int(v) for v in args.m_list.split(",")] if args.m_list else None
        shapes = DRY_RUN_SHAPES if args.dry_run else select_shapes(args.models)
    except ValueError as exc:
        ap.error(f"--m-list / --models: {exc}")
    if m_arg is not None and (not m_arg or min(m_arg) < 1):
        ap.error(f"--m-list needs positive token counts, got {args.m_list}")
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("bench_sparse24_matmul: needs a CUDA device (or --dry-run)", file=sys.stderr)
            return 2
        from sparsefast._ext import extension_error, load_extension

        if load_extension() is None:
            print(f"bench_sparse24_matmul: extension missing: {extension_error()}", file=sys.stderr)
            return 2
    if args.quick and not args.dry_run:
        shapes = shapes[:4]
    ms = m_arg or ([1, 16, 128, 2048] if args.quick else M_LIST)
    device = "cpu" if args.dry_run else "cuda"
    meta = {**run_metadata(device), "capability": None if args.dry_run else list(torch.cuda.get_device_capability(0)),
            "dry_run": args.dry_run, "weights": "random 2:4 (timings do not depend on values)",
            "timing": f"triton.testing.do_bench median, L2 flushed, warmup {WARMUP_MS} ms, rep {REP_MS} ms; "
                      "ms = CUDA-graph replay of one call (device time), ms_eager = eager call; 0.5 s GPU warm-up"}
    out = args.out or results_dir()
    results_path = result_path("sparse24-matmul", device=device, out_dir=out)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if not args.dry_run:
        warm_up_gpu()
    results, skipped = [], []
    for model, name, n, k in shapes:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(f"{model}-{name}")
            continue
        jobs = [(torch.float16, ms)] + ([(torch.bfloat16, [1, 16, 2048])] if args.bf16 and model == "llama-7b" else [])
        for dtype, m_list in jobs:
            try:
                for row in bench_shape(n, k, m_list, dtype):
                    results.append({"model": model, "linear": name, **row})
            except Exception as exc:  # one shape failing must not lose the others
                print(f"{model}-{name} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.dry_run:
            torch.cuda.empty_cache()
        write_json(results_path, {**meta, "partial": True, "results": results})  # survives a kill
    if skipped:
        print(f"budget {args.budget_s:.0f} s reached; skipped {skipped}", file=sys.stderr)
    meta["skipped_shapes"] = skipped
    fp16 = [r for r in results if r["dtype"] == "float16"]
    write_json(results_path, {**meta, "results": results})
    if fp16 and not skipped:
        table = {"rows": dispatch_rows(fp16, ms), "source": "bench_sparse24_matmul.py (eager timings)", **meta}
        write_json(result_path("sparse24-dispatch", device=device, out_dir=out), table)
        print("dispatch table:", table["rows"])
    else:
        print("dispatch table not written: the run did not cover every shape", file=sys.stderr)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
