"""Benchmark of the 2:4 kernels vs cuBLAS dense (torch F.linear) and torch's semi-structured path, same run.

For every LLaMA layer shape (bench/shapes.py) and M tokens: median time (triton do_bench, L2 flushed before each
call), dense-equivalent TFLOP/s (2·M·N·K), GB/s over the bytes each path must move (weight + x + y; the packed weight
is 0.5625 of the dense bytes), speedup vs dense. Writes bench/results/<date>-<device>-sparse24_matmul.json and the
Sparse24Linear dispatch table <date>-<device>-sparse24_dispatch.json (best backend per M, geometric mean over
shapes). Run: python bench/micro/bench_sparse24_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from shapes import all_shapes  # noqa: E402

M_LIST = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096]
BACKENDS = ("dense", "semi_structured", "cuda")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def bench_shape(n: int, k: int, ms: list[int], dtype: torch.dtype, warmup: int, rep: int) -> list[dict]:
    from triton.testing import do_bench

    from sparsefast.ops.sparse24 import DECODE_MAX_M, pack_sparse24, sparse24_matmul, to_sparse24_by_magnitude

    w = to_sparse24_by_magnitude(torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    values, meta = pack_sparse24(w)
    try:
        from torch.sparse import to_sparse_semi_structured

        w_semi, semi_err = to_sparse_semi_structured(w), None
    except Exception as exc:  # recorded in the JSON, not fatal
        w_semi, semi_err = None, f"{type(exc).__name__}: {exc}"
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        fns = {"dense": lambda: torch.nn.functional.linear(x, w),
               "cuda": lambda: sparse24_matmul(x, values, meta, n, k, backend="cuda")}
        if m <= DECODE_MAX_M:
            fns["cuda_gemm"] = lambda: sparse24_matmul(x, values, meta, n, k, backend="cuda", kernel="gemm")
        if w_semi is not None:
            fns["semi_structured"] = lambda: torch.nn.functional.linear(x, w_semi)
        flops = 2.0 * m * n * k
        io = 2.0 * (m * k + m * n)
        row = {"M": m, "N": n, "K": k, "dtype": str(dtype).replace("torch.", ""), "ms": {}, "errors": {}}
        if semi_err:
            row["errors"]["semi_structured"] = semi_err
        else:
            row["semi_structured_impl"] = type(w_semi).__name__
        for name, fn in fns.items():
            try:
                t = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
            except Exception as exc:
                row["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            row["ms"][name] = t
        wbytes = {"dense": 2.0 * n * k, "semi_structured": 2.0 * n * k * 0.5625, "cuda": 2.0 * n * k * 0.5625}
        wbytes["cuda_gemm"] = wbytes["cuda"]
        row["tflops"] = {b: flops / (t * 1e-3) / 1e12 for b, t in row["ms"].items()}
        row["gbps"] = {b: (wbytes[b] + io) / (t * 1e-3) / 1e9 for b, t in row["ms"].items()}
        if "dense" in row["ms"]:
            row["speedup_vs_dense"] = {b: row["ms"]["dense"] / t for b, t in row["ms"].items()}
        rows.append(row)
    return rows


def dispatch_rows(results: list[dict], ms: list[int]) -> list[list]:
    """Best backend per M (geometric mean of time over shapes), merged into [max_tokens, backend] rows."""
    best = []
    for m in ms:
        scores = {}
        for b in BACKENDS:
            ts = [r["ms"][b] for r in results if r["M"] == m and b in r["ms"]]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values")
    ap.add_argument("--bf16", action="store_true", help="also bf16 (llama-7b shapes)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sparse24_matmul: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from sparsefast._ext import extension_error, load_extension

    if load_extension() is None:
        print(f"bench_sparse24_matmul: extension missing: {extension_error()}", file=sys.stderr)
        return 2
    shapes = all_shapes()[:4] if args.quick else all_shapes()
    ms = [1, 16, 128, 2048] if args.quick else M_LIST
    results = []
    for model, name, n, k in shapes:
        for row in bench_shape(n, k, ms, torch.float16, warmup=10, rep=40):
            results.append({"model": model, "linear": name, **row})
        if args.bf16 and model == "llama-7b":
            for row in bench_shape(n, k, [1, 16, 2048], torch.bfloat16, warmup=10, rep=40):
                results.append({"model": model, "linear": name, **row})
        torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(0)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    tag = dev.replace(" ", "_").replace("/", "_")
    meta = {"device": dev, "capability": list(torch.cuda.get_device_capability(0)), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
            "commit": _commit(), "timing": "triton.testing.do_bench median, L2 flushed, warmup 10 ms, rep 40 ms"}
    out = Path(args.out)
    fp16 = [r for r in results if r["dtype"] == "float16"]
    table = {"rows": dispatch_rows(fp16, ms), "source": "bench_sparse24_matmul.py", **meta}
    _write_json(out / f"{stamp}-{tag}-sparse24_matmul.json", {**meta, "results": results})
    _write_json(out / f"{stamp}-{tag}-sparse24_dispatch.json", table)
    print(f"{'shape':28s} {'M':>5s} {'dense ms':>9s} {'ours ms':>9s} {'semi ms':>9s} {'x dense':>8s} "
          f"{'x semi':>7s} {'GB/s':>7s} {'TFLOP/s':>8s}")
    for r in results:
        t = r["ms"]
        if "cuda" not in t:
            print(f"{r['model']}-{r['linear']} M={r['M']}: errors {r['errors']}")
            continue
        semi = t.get("semi_structured", float("nan"))
        print(f"{r['model'] + '-' + r['linear'] + '-' + r['dtype'][:4]:28s} {r['M']:5d} {t.get('dense', 0):9.4f} "
              f"{t['cuda']:9.4f} {semi:9.4f} {t.get('dense', 0) / t['cuda']:8.2f} {semi / t['cuda']:7.2f} "
              f"{r['gbps']['cuda']:7.0f} {r['tflops']['cuda']:8.1f}")
    print("dispatch table:", table["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
