"""Pruning speed (`sparsefast bench prune`): Wanda (triton kernels), Wanda (torch twins), SparseGPT and magnitude on
the same model with the same calibration ids, in one run, through sparsefast.api.prune.

Reported per method: calibration-forward time (layer forwards incl. statistics hooks, plus the layer-0 capture),
metric+mask time (the pruner's metric, mask and weight update), their total, per decoder layer and for the whole
run, and peak memory: device memory on CUDA, else the process's peak RSS (cumulative over the methods; always in
the result). Ratios are against Wanda (triton) when it ran, else Wanda (torch). A `*-random` model measured with
fewer layers than the real one also gets an extrapolated whole-model time, labelled as such. A method that fails
while running (out of memory, a kernel error) is recorded under "failed" with its error and the others still run;
bad input (prune's checks, before any weight is touched) stops the run.

Models: any name sparsefast.models.load_model takes (e.g. `smollm2`), or `llama-7b-random`: a LlamaForCausalLM with
LLaMA-7B's shapes and random bf16 weights with a chosen number of decoder layers (sparsefast.bench.shapes.build_model;
`llama-tiny-random`: the same with small shapes, for dry runs). Calibration ids are random tokens. Neither changes
the timings: every kernel here does the same work whatever the values (the one exception, SparseGPT's damping
retries, is reported per linear).

This module imports torch only inside its functions: the CLI reads METHOD_CONFIGS for its --help.
"""

from __future__ import annotations

import time
from typing import Any

METHOD_CONFIGS = {"wanda-triton": ("wanda", {"backend": "triton"}), "wanda-torch": ("wanda", {"backend": "torch"}),
                  "sparsegpt": ("sparsegpt", {}), "magnitude": ("magnitude", {})}


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


def run_prune_bench(model: str | None = None, *, layers: int | None = None, methods: str | None = None,
                    pattern: str = "unstructured", nsamples: int | None = None, seqlen: int | None = None,
                    batch_size: int = 8, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Prune a fresh copy of the same weights with every method in the comma list `methods` (METHOD_CONFIGS names;
    default all, but wanda-triton only on CUDA), the same `nsamples` × `seqlen` random ids each; print one line per
    method and return the result dict (module docstring; `failed`: {method: error} of the methods that did not
    finish). Defaults follow the device: llama-7b-random, 128 × 2048 on CUDA; smollm2, 4 × 128 on CPU. Every setting
    is validated before any work."""
    import torch

    from sparsefast.api import prune
    from sparsefast.bench.memory import peak_rss_bytes
    from sparsefast.bench.shapes import FULL_LAYERS, build_model
    from sparsefast.config import make_config
    from sparsefast.device import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    name = model or ("llama-7b-random" if cuda else "smollm2")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else (
        list(METHOD_CONFIGS) if cuda else [m for m in METHOD_CONFIGS if m != "wanda-triton"])
    unknown = [m for m in chosen if m not in METHOD_CONFIGS]
    if unknown or not chosen:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_CONFIGS)}")
    nsamples = nsamples if nsamples is not None else (128 if cuda else 4)
    seqlen = seqlen if seqlen is not None else (2048 if cuda else 128)
    for flag, value in (("--nsamples", nsamples), ("--seqlen", seqlen)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    configs = {m: make_config(METHOD_CONFIGS[m][0], pattern=pattern, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              device=str(dev), batch_size=batch_size, **METHOD_CONFIGS[m][1]) for m in chosen}
    torch.manual_seed(seed)
    net, desc = build_model(name, layers, dev)
    vocab = net.config.vocab_size
    calib = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
    original = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    n_layers = net.config.num_hidden_layers
    out: dict[str, Any] = {
        "model": desc, "layers": n_layers, "pattern": pattern, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size,
                        "ids": "uniform random token ids (seeded); timings do not depend on the values"},
        "note": "weights are random where the model name ends in -random; timings do not depend on the values",
        "methods": {}, "failed": {}}
    for m in chosen:
        net.load_state_dict(original)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            report = prune(net, configs[m], calib, progress=False, offload=not cuda)
        except ValueError:
            raise  # bad input for this model, found by prune's checks before any work: nothing was measured
        except Exception as exc:  # noqa: BLE001 - a method that broke is a result: recorded, the others still run
            out["failed"][m] = f"{type(exc).__name__}: {exc}"
            print(f"{m:13s} FAILED: {out['failed'][m]}", flush=True)
            continue
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if cuda else None
        res = _method_result(report, peak, wall)
        res["peak_rss_bytes"] = peak_rss_bytes()
        if name in FULL_LAYERS and n_layers < FULL_LAYERS[name]:
            res["extrapolated_full_model"] = _extrapolate(res, n_layers, FULL_LAYERS[name])
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
