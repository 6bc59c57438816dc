"""`sparsefast bench prune`: pruning speed of Wanda (triton kernels), Wanda (torch twins), SparseGPT and magnitude on
the same model with the same calibration ids, in one run, through sparsefast.api.prune.

Reported per method: calibration-forward time (layer forwards incl. statistics hooks, plus the layer-0 capture),
metric+mask time (the pruner's metric, mask and weight update), their total, per decoder layer and for the whole
run, and peak memory: device memory on CUDA, else the process's peak RSS (cumulative over the methods; always in
the JSON). Ratios are against Wanda (triton) when it ran, else Wanda (torch).

Models: `smollm2` (or any name sparsefast.models.load_model takes) or `llama-7b-random`: a LlamaForCausalLM with
LLaMA-7B's shapes (hidden 4096, intermediate 11008, 32 heads) and random bf16 weights, built on the device with
`--layers N` decoder layers (`llama-tiny-random`: the same with small shapes, for dry runs). Calibration ids are
random tokens. Neither changes the timings: every kernel here does the same work whatever the values (the one
exception, SparseGPT's damping retries, is reported per linear).
Example (GPU): sparsefast bench prune llama-7b-random --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

METHOD_CONFIGS = {"wanda-triton": ("wanda", {"backend": "triton"}), "wanda-torch": ("wanda", {"backend": "torch"}),
                  "sparsegpt": ("sparsegpt", {}), "magnitude": ("magnitude", {})}
RANDOM_MODELS = {"llama-7b-random": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
                 # the dry run of bench/gpu/run.sh: same code path, shapes small enough for a CPU
                 "llama-tiny-random": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                           num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)}
FULL_LAYERS = {"llama-7b-random": 32}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks (prune: pruning speed of every method on one model)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", required=True)
    q = sub.add_parser("prune", help="pruning speed: wanda (triton / torch), sparsegpt, magnitude side by side")
    q.add_argument("model", nargs="?", default=None,
                   help="llama-7b-random (default on CUDA) or a load_model name, e.g. smollm2 (default on CPU)")
    q.add_argument("--layers", type=int, default=None, help="decoder layers of a *-random model (default 4)")
    q.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHOD_CONFIGS)} (default all; on CPU without CUDA all but "
                        "wanda-triton, whose interpreter timings mean nothing)")
    q.add_argument("--pattern", default="unstructured", help="unstructured (default, sparsity 0.5) or N:M")
    q.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 128 on CUDA, 4 on CPU)")
    q.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 2048 on CUDA, 128 on CPU)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration samples per layer forward (default 8)")
    q.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    q.add_argument("--seed", type=int, default=0, help="seed of the random ids and weights (default 0)")
    q.add_argument("--json", default=None, help="write the result JSON here (atomically)")
    q.set_defaults(func=run)
    from sparsefast.cli.bench_serve import add_serve_parser

    add_serve_parser(sub)
    return p


def build_model(name: str, layers: int | None, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(model in eval mode on `device`, description). *-random models are built on the device in bf16."""
    if name in RANDOM_MODELS:
        import transformers

        n = 4 if layers is None else layers
        if n < 1:
            raise ValueError(f"--layers must be >= 1, got {n}")
        cfg = transformers.LlamaConfig(num_hidden_layers=n, **RANDOM_MODELS[name])
        with device:
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        return model.eval(), f"{name}: LlamaForCausalLM, LLaMA-7B shapes, {n} layers, random bf16 weights"
    if layers is not None:
        raise ValueError("--layers applies only to *-random models; a loaded checkpoint keeps its layers")
    from sparsefast.models import load_model

    model, _ = load_model(name, device=device)
    return model, f"{name} ({model.config.num_hidden_layers} layers, {next(model.parameters()).dtype})"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (getrusage; Linux reports KiB, macOS bytes): on CPU the memory
    number that matters, and monotonic, so a method's value covers every method before it too."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _method_result(report: dict[str, Any], peak: int | None, wall: float) -> dict[str, Any]:
    t = report["timings"]
    per_layer = [{"layer": lt["layer"], "calib_forward_s": lt["calib_forward_s"], "metric_mask_s": lt["metric_mask_s"],
                  "stats_s": lt["stats_s"], "total_s": lt["calib_forward_s"] + lt["metric_mask_s"]}
                 for lt in t["per_layer"]]
    return {"calib_forward_s": t["calib_forward_s"], "capture_s": t.get("capture_s", 0.0), "stats_s": t["stats_s"],
            "metric_mask_s": t["metric_mask_s"], "total_s": t["calib_forward_s"] + t["metric_mask_s"],
            "wall_s": wall, "per_layer": per_layer, "achieved_sparsity": report["achieved_sparsity"],
            "peak_device_memory_bytes": peak}


def _extrapolate(res: dict[str, Any], layers: int, full: int) -> dict[str, Any]:
    """EXTRAPOLATED whole-model times: layer-0 capture once + mean per-layer times × `full` layers."""
    mean = {k: sum(lt[k] for lt in res["per_layer"]) / max(layers, 1) for k in ("calib_forward_s", "metric_mask_s")}
    calib = res["capture_s"] + mean["calib_forward_s"] * full
    metric = mean["metric_mask_s"] * full
    return {"label": f"EXTRAPOLATED from {layers} measured layers to {full}", "calib_forward_s": calib,
            "metric_mask_s": metric, "total_s": calib + metric}


def run_prune_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every requested method on a fresh copy of the same weights with the same ids; return the result dict."""
    from sparsefast.api import prune
    from sparsefast.config import make_config
    from sparsefast.device import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    name = args.model or ("llama-7b-random" if cuda else "smollm2")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else (
        list(METHOD_CONFIGS) if cuda else [m for m in METHOD_CONFIGS if m != "wanda-triton"])
    unknown = [m for m in methods if m not in METHOD_CONFIGS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_CONFIGS)}")
    nsamples = args.nsamples if args.nsamples is not None else (128 if cuda else 4)
    seqlen = args.seqlen if args.seqlen is not None else (2048 if cuda else 128)
    for flag, value in (("--nsamples", nsamples), ("--seqlen", seqlen)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    configs = {m: make_config(METHOD_CONFIGS[m][0], pattern=args.pattern, nsamples=nsamples, seqlen=seqlen,
                              seed=args.seed, device=str(device), batch_size=args.batch_size,
                              **METHOD_CONFIGS[m][1]) for m in methods}  # all validated before any work
    torch.manual_seed(args.seed)
    model, desc = build_model(name, args.layers, device)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(args.seed))
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    layers = model.config.num_hidden_layers
    out: dict[str, Any] = {
        "model": desc, "layers": layers, "pattern": args.pattern, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "batch_size": args.batch_size,
                        "ids": "uniform random token ids (seeded); timings do not depend on the values"},
        "note": "weights are random where the model name ends in -random; timings do not depend on the values",
        "methods": {}}
    for m in methods:
        model.load_state_dict(original)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        report = prune(model, configs[m], calib, progress=False, offload=not cuda)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        res = _method_result(report, peak, wall)
        res["peak_rss_bytes"] = peak_rss_bytes()
        if name in FULL_LAYERS and layers < FULL_LAYERS[name]:
            res["extrapolated_full_model"] = _extrapolate(res, layers, FULL_LAYERS[name])
        out["methods"][m] = res
        memory = f"peak {peak / 2**30:.2f} GiB" if cuda else f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB"
        print(f"{m:13s} calib_forward {res['calib_forward_s']:8.3f} s  metric+mask {res['metric_mask_s']:8.3f} s  "
              f"total {res['total_s']:8.3f} s  {memory}  sparsity {res['achieved_sparsity']:.4f}", flush=True)
    base = "wanda-triton" if "wanda-triton" in out["methods"] else "wanda-torch"
    if base in out["methods"]:
        b = out["methods"][base]
        out["ratios_vs"] = base
        out["ratios"] = {m: {k: r[k] / b[k] if b[k] > 0 else None for k in ("metric_mask_s", "total_s")}
                         for m, r in out["methods"].items()}
    return out


def run(args: argparse.Namespace) -> int:
    if args.bench_command != "prune":
        raise ValueError(f"unknown benchmark {args.bench_command!r}; available: prune")
    from sparsefast.checkpoint import check_output_file, write_json

    if args.json:
        check_output_file(args.json)  # a bad --json path fails before the benchmark, not after it
    result = run_prune_bench(args)
    if "ratios" in result:
        print(f"ratios vs {result['ratios_vs']} (metric+mask, total): " + ", ".join(
            f"{m} {r['metric_mask_s'] or 0:.1f}x / {r['total_s'] or 0:.2f}x" for m, r in result["ratios"].items()))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
