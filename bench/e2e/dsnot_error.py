"""What DSnoT's refinement does to a layer's output error: the mean error it minimises and the squared error that the
loss follows, on calibration tokens and on held-out ones (issue 25: DSnoT raised SmolLM2's perplexity).

For the attention projections DSnoT refines by default (q_proj, o_proj) of the chosen decoder layers, from the dense
model's activations of C4 samples (the first half fits the statistics, the second half is held out): the Wanda mask
at each pattern, then `sparsefast.prune.dsnot.dsnot_refine` with its defaults on the fitting half's statistics
(as the pipeline computes them), and for both masks, on both halves,

    rel_sq     = ||W X - (W*keep) X||^2 / ||W X||^2          (the squared reconstruction error, relative)
    mean_error = mean over outputs of |mean over tokens of (W X - (W*keep) X)|   (what DSnoT drives to zero)

    python bench/e2e/dsnot_error.py            # writes bench/results/<date>-cpu-smollm2-dsnot-error.json

Exits non-zero when nothing was measured.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsefast.bench.results import load_average, write_result
from sparsefast.data import get_calibration
from sparsefast.models import get_adapter, load_model
from sparsefast.models.layer_inputs import call_layer, capture_layer_inputs
from sparsefast.ops.wanda_mask import wanda_mask_ref
from sparsefast.prune.dsnot import dsnot_refine

LINEARS = ("q_proj", "o_proj")
PATTERNS = {"70%": {"sparsity": 0.7}, "50%": {"sparsity": 0.5}, "2:4": {"n": 2, "m": 4}}


def errors(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    dense = x @ w.T
    err = dense - x @ (w * ~pruned).T
    return {"rel_sq": float((err ** 2).sum() / (dense ** 2).sum()), "mean_error": float(err.mean(0).abs().mean())}


@torch.no_grad()
def measure(model, tokenizer, layers_wanted: list[int], nsamples: int, seqlen: int, data_dir: str | None) -> list:
    cpu = torch.device("cpu")
    layers = get_adapter(model).decoder_layers(model)
    calib = get_calibration("c4", tokenizer, 2 * nsamples, seqlen, seed=0, data_dir=data_dir)
    records = {half: capture_layer_inputs(model, layers, ids, device=cpu, batch_size=4, offload=True)
               for half, ids in (("fit", calib[:nsamples]), ("held", calib[nsamples:]))}
    rows = []
    for i, layer in enumerate(layers):
        if i > max(layers_wanted):
            break
        inputs: dict[str, dict[str, list]] = {half: {n: [] for n in LINEARS} for half in records}
        for half, recs in records.items():
            hooks = [getattr(layer.self_attn, n).register_forward_hook(
                lambda m, a, o, n=n, half=half: inputs[half][n].append(a[0].reshape(-1, a[0].shape[-1]).float()))
                for n in LINEARS]
            try:
                records[half] = [(call_layer(layer, h, kw, cpu), kw) for h, kw in recs]
            finally:
                for h in hooks:
                    h.remove()
        if i not in layers_wanted:
            continue
        for name in LINEARS:
            w = getattr(layer.self_attn, name).weight.float()
            fit, held = (torch.cat(inputs[half][name]) for half in ("fit", "held"))
            s1, sq = fit.double().sum(0), (fit.double() ** 2).sum(0)
            var = (sq / fit.shape[0] - (s1 / fit.shape[0]) ** 2).clamp_min(0)
            for pattern, kw in PATTERNS.items():
                mask = wanda_mask_ref(w, sq.float(), **kw)
                refined = dsnot_refine(w, mask, (s1 / nsamples).float(), var.float(), sq.float(),
                                       nm=(kw["n"], kw["m"]) if "n" in kw else None)
                row = {"layer": i, "linear": name, "pattern": pattern, "swapped": int((refined & ~mask).sum())}
                for half, x in (("fit", fit), ("held", held)):
                    for tag, m in (("wanda", mask), ("dsnot", refined)):
                        row.update({f"{half}_{tag}_{k}": v for k, v in errors(x, w, m).items()})
                rows.append(row)
                print(f"layer {i:2d} {name} {pattern:>3}: held-out rel_sq {row['held_wanda_rel_sq']:.4f} -> "
                      f"{row['held_dsnot_rel_sq']:.4f}, mean_error {row['held_wanda_mean_error']:.4f} -> "
                      f"{row['held_dsnot_mean_error']:.4f} ({row['swapped']} swaps)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layers", default="1,8,16,24,29", help="comma list of decoder layers")
    p.add_argument("--nsamples", type=int, default=16, help="C4 samples per half (fit / held out)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    wanted = [int(x) for x in args.layers.split(",")]
    load_before = load_average()
    rows = measure(model, tokenizer, wanted, args.nsamples, args.seqlen, args.data_dir)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    rises = sum(r["held_dsnot_rel_sq"] > r["held_wanda_rel_sq"] for r in rows)
    print(f"DSnoT raised the held-out squared error in {rises} of {len(rows)} cases")
    slug = "smollm2" if args.model == "smollm2" else "model"
    paths = write_result(f"{slug}-dsnot-error", {
        "protocol": __doc__.split("\n\n")[1], "model": args.model, "nsamples_per_half": args.nsamples,
        "seqlen": args.seqlen, "linears": list(LINEARS), "patterns": list(PATTERNS), "load_before": load_before,
        "held_rel_sq_rises": rises, "rows": rows}, device="cpu")
    print(f"wrote {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
