"""Why SparseGPT beats Wanda at 2:4 on SmolLM2-135M: is it the mask or the weight update?

Two measurements, same C4 calibration ids (seed 0, Wanda's sampler):

A. Per linear, on dense inputs of a few decoder layers (H = Σ x xᵀ from the dense model; not layer-sequential):
   relative reconstruction error ‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of
   magnitude, Wanda, SparseGPT's final mask applied without its update, Wanda's mask + SparseGPT's OBS update,
   and SparseGPT; plus the mask overlap of Wanda and SparseGPT and how outlier-heavy the input norms are
   (max ‖X_j‖ / median ‖X_j‖, the feature Wanda's metric was designed around).
B. End to end (layer-sequential pruning of the whole model, WikiText-2 gptq protocol, first --windows windows):
   Wanda, Wanda mask + SparseGPT update, SparseGPT.

    python bench/e2e/mask_vs_update.py       # writes bench/results/<date>-cpu-smollm2-mask-vs-update.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsefast.bench.results import result_path, run_metadata


def capture_hessians(model, adapter, layer_ids: list[int], calib: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """{"<layer>.<linear>": (Σ x xᵀ float64 [in, in], tokens)} from the dense model on `calib`, one sample a time."""
    layers = adapter.decoder_layers(model)
    acc: dict[str, list] = {}
    hooks = []
    for i in layer_ids:
        for name, lin in adapter.prunable_linears(layers[i]).items():
            key = f"{i}.{name}"
            acc[key] = [torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64), 0]

            def hook(_m, args, _out, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                acc[key][0].addmm_(x.T, x)
                acc[key][1] += x.shape[0]

            hooks.append(lin.register_forward_hook(hook))
    with torch.inference_mode():
        for row in calib:
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: (v[0], v[1]) for k, v in acc.items()}


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return float(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w.double(), h, w.double()))


def per_linear(model, adapter, layer_ids, calib, n: int, m: int) -> list[dict]:
    from sparsefast.ops.wanda_mask import wanda_mask
    from sparsefast.prune.magnitude import magnitude_mask
    from sparsefast.prune.sparsegpt import sparsegpt_prune_weight

    hessians = capture_hessians(model, adapter, layer_ids, calib)
    layers = adapter.decoder_layers(model)
    rows = []
    for key, (hsum, tokens) in hessians.items():
        i, name = key.split(".", 1)
        w = adapter.prunable_linears(layers[int(i)])[name].weight.detach().double()
        h = 2.0 * hsum / calib.shape[0]  # SparseGPT's scaling (irrelevant to every ratio below)
        norms = torch.diagonal(hsum).sqrt()
        wanda = wanda_mask(w.float(), torch.diagonal(hsum).float(), n=n, m=m, backend="torch")
        sgpt, _ = sparsegpt_prune_weight(w, h, sparsity=0.0, nm=(n, m))
        sgpt_mask = sgpt == 0
        wanda_upd, _ = sparsegpt_prune_weight(w, h, sparsity=0.0, mask=wanda)
        mag = magnitude_mask(w.float(), n=n, m=m, backend="torch")
        rows.append({
            "linear": key, "shape": list(w.shape), "tokens": tokens,
            "rel_error": {"magnitude": rel_error(w, w.masked_fill(mag, 0), h),
                          "wanda": rel_error(w, w.masked_fill(wanda, 0), h),
                          "sparsegpt_mask_no_update": rel_error(w, w.masked_fill(sgpt_mask, 0), h),
                          "wanda_mask_sparsegpt_update": rel_error(w, wanda_upd, h),
                          "sparsegpt": rel_error(w, sgpt, h)},
            "mask_overlap_wanda_sparsegpt": float((wanda & sgpt_mask).sum() / wanda.sum()),
            "input_norm_max_over_median": float(norms.max() / norms.median()),
        })
        e = rows[-1]["rel_error"]
        print(f"{key:22s} " + " ".join(f"{k} {v:.4f}" for k, v in e.items()), flush=True)
    return rows


def end_to_end(model_name, calib, n: int, m: int, windows: int, data_dir) -> dict:
    from sparsefast.api import evaluate, prune
    from sparsefast.calibrate import prune_layerwise
    from sparsefast.config import make_config
    from sparsefast.models import get_adapter, load_model
    from sparsefast.ops.wanda_mask import wanda_mask
    from sparsefast.prune.sparsegpt import SparseGPTPruner

    class WandaMaskSparseGPTUpdate(SparseGPTPruner):
        def fixed_mask(self, linear, hessian):
            return wanda_mask(linear.weight.data, torch.diagonal(hessian).float(), n=n, m=m, backend="torch")

    out = {}
    for method in ("wanda", "wanda_mask_sparsegpt_update", "sparsegpt"):
        model, tok = load_model(model_name, device="cpu")
        cfg = make_config("sparsegpt" if method != "wanda" else "wanda", pattern=f"{n}:{m}",
                          nsamples=calib.shape[0], seqlen=calib.shape[1])
        t0 = time.perf_counter()
        if method == "wanda_mask_sparsegpt_update":
            prune_layerwise(model, get_adapter(model), WandaMaskSparseGPTUpdate(cfg), calib,
                            device=torch.device("cpu"), progress=False)
        else:
            prune(model, cfg, calib, progress=False)
        prune_s = time.perf_counter() - t0
        ppl = evaluate(model, tok, ["wikitext2"], seqlen=512, max_windows=windows, data_dir=data_dir,
                       progress=False)["wikitext2"]
        out[method] = {"wikitext2_ppl": float(ppl), "prune_s": prune_s}
        print(f"{method}: wikitext2 ppl {ppl:.3f} (first {windows} windows), prune {prune_s:.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from sparsefast.checkpoint import write_json
    from sparsefast.data import get_calibration
    from sparsefast.models import get_adapter, load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--layers", default="0,7,14,21,29", help="decoder layers for part A")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 windows for part B (0: skip part B)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    n, m = (int(v) for v in args.pattern.split(":"))
    out = Path(args.out) if args.out else result_path(f"{Path(args.model).name}-mask-vs-update", device="cpu")
    model, tok = load_model(args.model, device="cpu")
    adapter = get_adapter(model)
    layer_ids = [int(v) for v in args.layers.split(",")]
    calib = get_calibration("c4", tok, args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
    result = {"what": __doc__.splitlines()[0], "model": args.model, "pattern": args.pattern,
              "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
              "metadata": run_metadata("cpu"), "command": " ".join([sys.executable, *sys.argv])}
    rows = per_linear(model, adapter, layer_ids, calib, n, m)
    keys = list(rows[0]["rel_error"])
    result["per_linear"] = rows
    result["geomean_rel_error"] = {k: math.exp(statistics.fmean(math.log(r["rel_error"][k]) for r in rows))
                                   for k in keys}
    result["median_mask_overlap"] = statistics.median(r["mask_overlap_wanda_sparsegpt"] for r in rows)
    result["median_input_norm_max_over_median"] = statistics.median(r["input_norm_max_over_median"] for r in rows)
    print("geometric mean of the relative errors:", {k: round(v, 4) for k, v in result["geomean_rel_error"].items()})
    write_json(out, result)
    del model
    if args.windows:
        result["end_to_end"] = {"eval": {"dataset": "wikitext2", "protocol": "gptq", "seqlen": 512,
                                         "windows": args.windows}, **end_to_end(args.model, calib, n, m, args.windows,
                                                                                 args.data_dir)}
        write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
