"""The summary of a `bench decode` run (sparsefast.bench.decode_run): per variant medians over rounds, weight GB/s
against the copy bandwidth of the same run, ratios, and the issue's goals checked from the numbers.

Definitions (every engine the same way):
* TPOT at batch 1 = (time of the last token − time of the first) / (N − 1): sparsefast's engine and llama.cpp
  timestamp every token; vLLM reports no per-token times through `LLM.generate`, so its TPOT is (t_N − t_1) /
  (N − 1) from two runs of the round (max_tokens 1 and N). Decode tokens/s = 1 / TPOT.
* weight bytes per token: sparsefast: every tensor a one-token step reads (sparsefast.bench.decode
  .weight_bytes_per_token); llama.cpp: the GGUF file's size (its tensors; the tied embedding is read whole as the
  output matrix, as in ours); vLLM: the sparsefast model's at the same dtype (the same tensors: the dense model, or
  for a sparse checkpoint run by sparsefast's vLLM plugin the same packed layouts).
* weight GB/s = bytes per token / TPOT; fraction of the copy bandwidth (bytes read + written per second of a
  256 MiB copy, the best of the measurements before and after the rounds).
* C concurrent: the median over requests of their TPOT, and output tokens/s = C·N / (last token − submit).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from sparsefast.bench.decode_options import is_int8

GOALS = {
    "dense_fp32_b1_fraction_of_copy_bw": 0.60,
    "sparse_vs_compiled_dense_fp32_b1": 1.5,
    "bf16_dense_vs_fp32_dense_b1": 1.7,
    "bf16_24_vs_bf16_dense_b1": 1.4,
    "concurrent_vs_b1_output_throughput": 4.0,
    "vllm_sparse_vs_dense_b1": 1.3,  # issue 23: a sparse checkpoint through sparsefast's vLLM plugin
    "sparse_int8_vs_llama_cpp_q8_0_b1": 1.4,  # issue 24: 2:4 / 50% int8 against llama.cpp's 8-bit file
    "sparse_int8_vs_dense_int8_b1": 1.6,
}
QUANTIZED_GGUF = ("Q8_0", "Q4_1")  # llama.cpp's quantized files: the peers of sparsefast's int8 variants
PEER_PRECISION = {"float32": ("F32", "float32"), "bfloat16": ("BF16", "bfloat16")}  # llama.cpp type, vLLM dtype


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _tpot(reply: dict) -> float | None:
    """Batch-1 TPOT of one reply (module docstring), None for an error."""
    res = reply.get("result")
    if not res:
        return None
    if "tpot_s" in res:
        return res["tpot_s"]
    rate = res.get("decode_tokens_per_s")
    return 1 / rate if rate else None


def variant_summary(rows: dict[str, list], ready: dict[str, Any], weight_bytes: int | None,
                    copy_gbs: float) -> dict[str, Any]:
    """Medians over rounds of one variant's replies."""
    tpot = _median([_tpot(r) for r in rows["b1"]])
    out: dict[str, Any] = {
        "weight_bytes_per_token": weight_bytes,
        "b1_tpot_s": tpot, "b1_tokens_per_s": 1 / tpot if tpot else None,
        "b1_ttft_s": _median([r.get("result", {}).get("ttft_s") for r in rows["b1"]]),
        "b1_median_itl_s": _median([r.get("result", {}).get("median_itl_s") for r in rows["b1"]]),
        "errors": [r["error"] for r in rows["b1"] + rows["concurrent"] if "error" in r],
    }
    if weight_bytes and tpot:
        out["b1_weight_gbs"] = weight_bytes / tpot / 1e9
        out["b1_fraction_of_copy_bw"] = out["b1_weight_gbs"] / copy_gbs
    if rows["concurrent"]:
        results = [r.get("result", {}) for r in rows["concurrent"]]
        out["concurrent_output_tokens_per_s"] = _median([r.get("output_tokens_per_s") for r in results])
        out["concurrent_tpot_s"] = _median([r.get("tpot_s_median", r.get("tpot_s")) for r in results])
        if out["concurrent_output_tokens_per_s"] and out["b1_tokens_per_s"]:
            out["concurrent_vs_b1"] = out["concurrent_output_tokens_per_s"] / out["b1_tokens_per_s"]
    for key in ("compile_seconds", "swapped", "load_s", "swap_s", "version", "threads"):
        if key in ready:
            out[key] = len(ready[key]) if key == "swapped" else ready[key]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(variants: list, raw: dict[str, dict[str, list]], readies: dict[str, dict], bandwidth: dict[str, Any],
              concurrency: int) -> dict[str, Any]:
    """{"variants": {name: variant_summary}, "ratios": {...}, "goals": {...}} (module docstring). `variants`:
    decode_run.Variant list in measurement order."""
    copy_gbs = bandwidth["copy_gbs"]
    by_name = {v.name: v for v in variants}
    sf = {(v.sparsity, v.precision, v.compiled): v.name for v in variants if v.kind == "sparsefast"}

    def weight_bytes(v) -> int | None:
        if v.kind == "sparsefast":
            return readies[v.name]["weight_bytes_per_token"]
        if v.kind == "llama_cpp":
            return readies[v.name].get("model_bytes")
        # vLLM: the bytes of the same weights in sparsefast (the dense model, or the sparse one its plugin runs)
        same = sf.get((v.sparsity, v.precision, True)) or sf.get((v.sparsity, v.precision, False))
        return readies[same]["weight_bytes_per_token"] if same else None

    summary = {name: variant_summary(raw[name], readies[name], weight_bytes(by_name[name]), copy_gbs)
               for name in raw}

    def rate(name: str | None) -> float | None:
        return summary[name]["b1_tokens_per_s"] if name in summary else None

    ratios: dict[str, Any] = {}
    for (sparsity, precision, compiled), name in sf.items():
        mode = "compiled" if compiled else "eager"
        r = ratios.setdefault(name, {})
        r["vs_dense_same_precision_and_mode"] = _ratio(rate(name), rate(sf.get(("dense", precision, compiled))))
        r["vs_compiled_dense_same_precision"] = _ratio(rate(name), rate(sf.get(("dense", precision, True))))
        r["vs_dense_torch_same_precision_and_mode"] = _ratio(rate(name),
                                                             rate(sf.get(("dense-torch", precision, compiled))))
        if compiled:
            r["compiled_vs_eager"] = _ratio(rate(name), rate(sf.get((sparsity, precision, False))))
        if precision == "bfloat16":
            r["bf16_vs_fp32_same_mode"] = _ratio(rate(name), rate(sf.get((sparsity, "float32", compiled))))
        for peer_kind, peer in ((v.kind, v.name) for v in variants if v.kind != "sparsefast"):
            llama_type, vllm_dtype = PEER_PRECISION.get(precision, (None, None))
            peer_type = by_name[peer].precision.upper()
            if peer_kind == "llama_cpp" and (peer_type == llama_type or is_int8(sparsity) and
                                             peer_type in QUANTIZED_GGUF) or \
                    peer_kind == "vllm" and by_name[peer].precision == vllm_dtype:
                r[f"vs {peer}"] = _ratio(rate(name), rate(peer))
        r["label"] = f"{sparsity} {precision} {mode}"
    return {"copy_gbs": copy_gbs, "variants": summary, "ratios": ratios,
            "goals": goals(summary, sf, variants, concurrency)}


def goals(summary: dict[str, dict], sf: dict[tuple, str], variants: list, concurrency: int) -> dict[str, Any]:
    """The issue's goals, each {"value", "target", "met"} (None where the run lacks a variant it needs); the
    compiled step where it was measured, else the eager one."""
    def best(sparsity: str, precision: str) -> dict | None:
        name = sf.get((sparsity, precision, True)) or sf.get((sparsity, precision, False))
        return summary.get(name) if name else None

    def check(value: float | None, target: float, higher: bool = True) -> dict[str, Any]:
        met = None if value is None else (value >= target if higher else value <= target)
        return {"value": value, "target": target, "met": met}

    def b1(s: dict | None) -> float | None:
        return s["b1_tokens_per_s"] if s else None

    dense32, dense16 = best("dense", "float32"), best("dense", "bfloat16")
    out: dict[str, Any] = {
        "dense_fp32_b1_fraction_of_copy_bw": check((dense32 or {}).get("b1_fraction_of_copy_bw"),
                                                   GOALS["dense_fp32_b1_fraction_of_copy_bw"]),
        "bf16_dense_vs_fp32_dense_b1": check(_ratio(b1(dense16), b1(dense32)), GOALS["bf16_dense_vs_fp32_dense_b1"]),
        "bf16_24_vs_bf16_dense_b1": check(_ratio(b1(best("2:4", "bfloat16")), b1(dense16)),
                                          GOALS["bf16_24_vs_bf16_dense_b1"]),
    }
    for sparsity in ("2:4", "50%"):
        out[f"{sparsity}_vs_compiled_dense_fp32_b1"] = check(_ratio(b1(best(sparsity, "float32")), b1(dense32)),
                                                             GOALS["sparse_vs_compiled_dense_fp32_b1"])
    q8 = next((summary[v.name] for v in variants if v.kind == "llama_cpp" and v.precision.upper() == "Q8_0"), None)
    for sparsity in ("2:4-int8", "50%-int8", "2:4-w8a8", "50%-w8a8"):
        ours = best(sparsity, "float32")
        if ours is None:
            continue
        dense = "dense-" + sparsity.split("-")[1]  # the dense model with the same numerics
        out[f"{sparsity} float32 b1 vs llama.cpp Q8_0"] = check(_ratio(b1(ours), b1(q8)),
                                                                GOALS["sparse_int8_vs_llama_cpp_q8_0_b1"])
        out[f"{sparsity} float32 b1 vs {dense}"] = check(_ratio(b1(ours), b1(best(dense, "float32"))),
                                                         GOALS["sparse_int8_vs_dense_int8_b1"])
    if dense32 and "concurrent_vs_b1" in dense32:
        out["dense_fp32_concurrent_vs_b1"] = check(dense32["concurrent_vs_b1"],
                                                   GOALS["concurrent_vs_b1_output_throughput"])
    vllm_dense = {v.precision: summary.get(v.name) for v in variants if v.kind == "vllm" and v.sparsity == "dense"}
    for v in variants:
        if v.kind == "vllm" and v.sparsity != "dense":  # issue 23: the plugin's sparse model vs vLLM's dense one
            dense = vllm_dense.get(v.precision)
            out[f"{v.name} b1 vs vLLM {v.precision} dense"] = check(_ratio(b1(summary[v.name]), b1(dense)),
                                                                    GOALS["vllm_sparse_vs_dense_b1"])
            out[f"{v.name} c{concurrency} output tok/s vs vLLM {v.precision} dense"] = check(
                _ratio(summary[v.name].get("concurrent_output_tokens_per_s"),
                       (dense or {}).get("concurrent_output_tokens_per_s")),
                1.0)
            continue
        if v.kind == "sparsefast" or v.precision.upper() in QUANTIZED_GGUF:
            continue
        precision = "float32" if v.precision.lower() in ("f32", "float32") else "bfloat16"
        ours = best("2:4", precision)
        out[f"2:4 {precision} b1 vs {v.name}"] = check(_ratio(b1(ours), b1(summary[v.name])), 1.0)
        if v.kind == "vllm" and precision == "float32" and dense32:
            out[f"dense fp32 c{concurrency} TPOT vs {v.name}"] = check(
                _ratio(dense32.get("concurrent_tpot_s"), summary[v.name].get("concurrent_tpot_s")), 1.0,
                higher=False)
    return out


def plot(result: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Two panels of a `bench decode` result, one bar per measured variant in run order: batch-1 decode tokens/s
    (each bar labelled with the weight MB a token reads) and output tokens/s at C concurrent requests (engines that
    decode one sequence at a time have no bar). PNG written atomically (sparsefast.bench.results.save_figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsefast.bench.results import save_figure

    rows = [(name, s) for name, s in result["variants"].items() if s.get("b1_tokens_per_s")]
    if not rows:
        raise ValueError("decode plot: the result has no measured variant")
    names = [name.removeprefix("sparsefast ").replace(" float32", " fp32").replace(" compiled", "") for name, _ in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    colors = ["tab:blue" if name.startswith("sparsefast") else "tab:gray" for name, _ in rows]
    b1 = [s["b1_tokens_per_s"] for _, s in rows]
    ax1.barh(names, b1, color=colors)
    for y, (value, (_, s)) in enumerate(zip(b1, rows)):
        if s.get("weight_bytes_per_token"):
            ax1.text(value, y, f" {s['weight_bytes_per_token'] / 1e6:.0f} MB", va="center", fontsize=7)
    conc = [s.get("concurrent_output_tokens_per_s") or 0 for _, s in rows]
    ax2.barh(names, conc, color=colors)
    concurrency = result.get("conditions", {}).get("concurrency", "C")
    for ax, title in ((ax1, "batch 1: decode tokens/s (weight MB read per token)"),
                      (ax2, f"{concurrency} concurrent: output tokens/s")):
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    ax1.invert_yaxis()  # run order from the top (the axes share y: once for both)
    meta = result.get("metadata", {})
    cpu = meta.get("cpu", {}).get("Model name") or meta.get("device", "?")
    fig.suptitle(f"{cpu}, {result.get('threads')} threads, copy bandwidth {result['copy_gbs']:.1f} GB/s, "
                 f"{meta.get('date', '')[:16]}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """python -m sparsefast.bench.decode_report RESULT.json [--out PNG]: the plot of a written result."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("result", help="a JSON written by `sparsefast bench decode`")
    p.add_argument("--out", default=None, help="PNG path (default: the result's path with .png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = p.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    out = plot(result, args.out or Path(args.result).with_suffix(".png"), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
