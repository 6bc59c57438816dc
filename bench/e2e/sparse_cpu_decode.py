"""Batch-1 CPU decode tokens/s of SmolLM2-135M: dense vs Wanda 2:4 vs Wanda 50% / 70% unstructured, one run.

    python bench/e2e/sparse_cpu_decode.py --threads 2      # on a quiet machine: the swap times kernels at load

Each pruned model is swapped with `sparsefast.nn.sparsify_` (per-layer dense / 2:4 / unstructured by timings on this
machine); the embedding-tied lm_head stays dense. Decode speed is sparsefast.eval.latency.decode_latency (a cached
greedy loop over the HF forward, gpt-fast's measurement) and the serving engine's batch-1 decode (sparsefast.serve,
median inter-token latency), one generation per variant in turn for --repeats rounds, medians. Wanda is
calibrated on few samples (--nsamples x --seqlen from the bundled C4): the mask pattern, not its quality, sets the
speed. Linear-weight bytes per token and the measured copy bandwidth are reported next to tokens/s. Writes
bench/results/<date>-cpu-sparse-decode.json; committed runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsefast.api import prune
from sparsefast.bench.decode import engine_batch1
from sparsefast.bench.memory import copy_bandwidth_gbs, tensor_bytes
from sparsefast.bench.results import result_path, run_metadata
from sparsefast.checkpoint import write_json
from sparsefast.config import WandaConfig
from sparsefast.data.calibration import get_calibration
from sparsefast.eval.latency import decode_latency
from sparsefast.models import load_model
from sparsefast.nn import SparseLinear, sparsify_
from sparsefast.serve.engine import GenerationEngine

VARIANTS = {"dense": None, "wanda-2:4": ("2:4", 0.5), "wanda-50%": ("unstructured", 0.5),
            "wanda-70%": ("unstructured", 0.7)}


def linear_weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every linear weight a one-token decode step reads: the packed weight where the layer's table runs
    the kernel at M = 1, else its dense weight (the lm_head counted once)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            total += tensor_bytes(*mod.packed()) if mod.dispatch.backend_for(1) == "cpu" else tensor_bytes(
                mod.dense_weight())
        elif isinstance(mod, torch.nn.Linear):
            total += tensor_bytes(mod.weight)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    copy_gbs = copy_bandwidth_gbs("cpu")
    records: dict[str, dict] = {}
    models = {}
    calib = None
    for name, spec in VARIANTS.items():
        model, tok = load_model("smollm2", dtype=torch.float32)
        rec: dict = {}
        if spec is not None:
            pattern, sparsity = spec
            if calib is None:
                calib = get_calibration("c4", tok, args.nsamples, args.seqlen)
            cfg = WandaConfig(sparsity=sparsity, pattern=pattern, nsamples=args.nsamples, seqlen=args.seqlen,
                              device="cpu")
            t0 = time.perf_counter()
            prune(model, cfg, calib, progress=False)
            rec["prune_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            swaps = sparsify_(model)
            rec["swap_s"] = time.perf_counter() - t0
            rec["layers"] = {k: sum(r["chosen"] == k for r in swaps.values()) for k in ("dense", "2:4", "unstructured")}
        rec["weight_bytes_per_token"] = linear_weight_bytes_per_token(model)
        models[name], records[name] = model, rec
    runs: dict[str, list[float]] = {name: [] for name in models}
    engine_runs: dict[str, list[float]] = {name: [] for name in models}
    # Phase 1, the cached greedy loop on this (the initial) thread, before any engine thread exists: every thread
    # that runs torch ops gets an OpenMP team, and more OpenMP threads than cores make libgomp throttle its
    # spin-waiting, which slows the initial thread's parallel regions. Round-robin over the variants in both phases:
    # slow phases of a shared machine hit all alike.
    with torch.inference_mode():
        for r in range(args.repeats):
            for name, model in models.items():
                lat = decode_latency(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=1,
                                     warmup=1 if r == 0 else 0)
                runs[name].append(lat["decode_ms_per_token"])
    # Phase 2, the serving engine (its own thread per engine): median inter-token latency at batch 1.
    engines = {name: GenerationEngine(model, tok, max_batch=1, max_model_len=args.prompt_len + args.new_tokens + 8)
               for name, model in models.items()}
    for engine in engines.values():
        engine.start()
    prompt = tok("The history of the city", add_special_tokens=False)["input_ids"] * args.prompt_len
    prompt = prompt[:args.prompt_len]
    try:
        for r in range(args.repeats):
            for name in models:
                if r == 0:
                    engine_batch1(engines[name], prompt, 4)  # warm-up
                itl = engine_batch1(engines[name], prompt, args.new_tokens)["median_itl_s"]
                engine_runs[name].append(1e3 * itl)
    finally:
        for engine in engines.values():
            engine.shutdown()
    for name, rec in records.items():
        ms, engine_ms = statistics.median(runs[name]), statistics.median(engine_runs[name])
        rec.update(decode_ms_per_token=ms, runs_decode_ms_per_token=runs[name], tokens_per_s=1e3 / ms,
                   engine_ms_per_token=engine_ms, runs_engine_ms_per_token=engine_runs[name],
                   engine_tokens_per_s=1e3 / engine_ms)
        rec["weight_gbs"] = rec["weight_bytes_per_token"] * rec["tokens_per_s"] / 1e9
        rec["engine_weight_gbs"] = rec["weight_bytes_per_token"] * rec["engine_tokens_per_s"] / 1e9
        print(f"{name}: {rec['tokens_per_s']:.1f} tok/s (engine {rec['engine_tokens_per_s']:.1f}), "
              f"{rec['weight_gbs']:.1f} GB/s of weights (engine {rec['engine_weight_gbs']:.1f}) "
              f"{rec.get('layers', '')}", flush=True)
    dense, dense_engine = records["dense"]["tokens_per_s"], records["dense"]["engine_tokens_per_s"]
    for rec in records.values():
        rec["speedup_vs_dense"] = rec["tokens_per_s"] / dense
        rec["engine_speedup_vs_dense"] = rec["engine_tokens_per_s"] / dense_engine
    path = result_path("sparse-decode", device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"what": "SmolLM2-135M batch-1 CPU decode, dense vs Wanda 2:4 / 50% / 70% swapped",
                      "metadata": run_metadata("cpu"), "threads": torch.get_num_threads(),
                      "copy_bandwidth_gbs": copy_gbs, "args": vars(args), "variants": records})
    print(f"wrote {path}; copy bandwidth {copy_gbs:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
