"""Wanda mask microbenchmark: the fused triton kernel vs the torch twin vs the published Wanda formulation, and
SparseGPT's metric+update time on the same layer shapes, all timed in one run (bf16 weights, fp32 Σx²).

- triton_kernel_ms: the launcher alone (no host sync) — used for GB/s and the fraction of copy bandwidth.
- triton_op_ms: sparsefast.ops.wanda_mask (argument checks + kernel + one sync for the non-finite flag).
- triton_prune_ms: wanda_prune_ in place (check_finite=False: kernel + sync), bytes = W read + W written.
- torch_twin_ms: wanda_mask_ref (chunked stable sort). published_ms: Wanda's code path — the metric |W|·√s, a full
  stable torch.sort per row and a scatter of the first k indices; for N:M a Python loop over M-groups with topk.
- sparsegpt_s: sparsefast.prune.sparsegpt.sparsegpt_prune_weight given H (LLaMA-7B shapes; quick: tiny), once.
Bytes for the mask variants: W read + Σx² read + bool mask written.
"""

from __future__ import annotations

import pytest
import torch

from sparsefast.bench.memory import gbs
from sparsefast.bench.shapes import PER_LAYER, bench_shapes, quick_mode, shape_id
from sparsefast.bench.timing import time_ms, time_once_s
from sparsefast.kernels.wanda_mask import wanda_mask_triton
from sparsefast.ops.wanda_mask import pruned_per_row, wanda_mask, wanda_mask_ref, wanda_prune_

QUICK = quick_mode()
PATTERNS = {"unstructured-0.5": {"sparsity": 0.5}, "2:4": {"n": 2, "m": 4}}
SUMMARY_MODEL = "tiny" if QUICK else "llama-7b"


def published_wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, sparsity: float | None = None,
                         n: int | None = None, m: int | None = None) -> torch.Tensor:
    """The formulation of the Wanda reference code (metric materialised, full sort / per-group topk loop)."""
    metric = weight.abs() * torch.sqrt(act_sq_norm.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if n is not None:
        for i in range(0, metric.shape[1], m):
            tmp = metric[:, i:i + m].float()
            mask.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    else:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
        mask.scatter_(1, idx, True)
    return mask


def _inputs(out: int, inn: int, device: str):
    g = torch.Generator(device=device).manual_seed(out * 7 + inn)
    w = torch.randn(out, inn, device=device, generator=g).to(torch.bfloat16)
    s = torch.rand(inn, device=device, generator=g) * 10
    return w, s


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("shape", bench_shapes(), ids=shape_id)
def test_wanda_mask(benchmark, shape, pattern, results, copy_gbs, device):
    model, linear, out, inn = shape
    kw = PATTERNS[pattern]
    w, s = _inputs(out, inn, device)
    expect = wanda_mask_ref(w, s, **kw)
    got = benchmark(lambda: wanda_mask(w, s, backend="triton", **kw))
    assert torch.equal(got, expect), "triton mask differs from the torch twin: timings would be meaningless"
    launch = {"k": pruned_per_row(inn, kw["sparsity"])} if "sparsity" in kw else {"n": kw["n"], "m": kw["m"]}
    scratch = w.clone()
    row = {"model": model, "linear": linear, "out": out, "in": inn, "pattern": pattern, "dtype": "bfloat16",
           "triton_kernel_ms": time_ms(lambda: wanda_mask_triton(w, s, **launch)),
           "triton_op_ms": time_ms(lambda: wanda_mask(w, s, backend="triton", **kw)),
           "triton_prune_ms": time_ms(lambda: wanda_prune_(scratch, s, backend="triton", check_finite=False, **kw)),
           "torch_twin_ms": time_ms(lambda: wanda_mask_ref(w, s, **kw), warmup_ms=5, rep_ms=30),
           "published_ms": time_ms(lambda: published_wanda_mask(w, s, **kw), warmup_ms=5, rep_ms=30)}
    mask_bytes = w.numel() * w.element_size() + s.numel() * 4 + w.numel()
    prune_bytes = 2 * w.numel() * w.element_size() + s.numel() * 4
    row["bytes_mask"] = mask_bytes
    row["triton_kernel_gbs"] = gbs(mask_bytes, row["triton_kernel_ms"])
    row["triton_op_gbs"] = gbs(mask_bytes, row["triton_op_ms"])
    row["triton_prune_gbs"] = gbs(prune_bytes, row["triton_prune_ms"])
    row["kernel_frac_of_copy_bw"] = row["triton_kernel_gbs"] / copy_gbs
    row["speedup_op_vs_twin"] = row["torch_twin_ms"] / row["triton_op_ms"]
    row["speedup_op_vs_published"] = row["published_ms"] / row["triton_op_ms"]
    results.setdefault("wanda_mask", []).append(row)
    print(f"\n{shape_id(shape)} {pattern}: kernel {row['triton_kernel_ms']:.3f} ms "
          f"({row['triton_kernel_gbs']:.0f} GB/s, {100 * row['kernel_frac_of_copy_bw']:.0f}% of copy), "
          f"op {row['triton_op_ms']:.3f} ms, twin {row['torch_twin_ms']:.2f} ms, "
          f"published {row['published_ms']:.2f} ms")


def _sparsegpt_shapes() -> list[tuple[str, str, int, int]]:
    return [s for s in bench_shapes() if s[0] == SUMMARY_MODEL]


@pytest.mark.parametrize("shape", _sparsegpt_shapes(), ids=shape_id)
def test_sparsegpt_metric_time(shape, results, device):
    from sparsefast.prune.sparsegpt import sparsegpt_prune_weight

    model, linear, out, inn = shape
    tokens = 64 if QUICK else 2048
    g = torch.Generator(device=device).manual_seed(inn)
    x = torch.randn(tokens, inn, device=device, generator=g)
    hessian = 2.0 * (x.T @ x) / tokens
    w, _ = _inputs(out, inn, device)
    sparsegpt_prune_weight(w[:64, :256], hessian[:256, :256].clone(), sparsity=0.5)  # warm-up: solver/BLAS init
    secs = time_once_s(lambda: sparsegpt_prune_weight(w, hessian, sparsity=0.5))
    results.setdefault("wanda_mask", []).append({"model": model, "linear": linear, "out": out, "in": inn,
                                                 "pattern": "unstructured-0.5", "sparsegpt_s": secs,
                                                 "sparsegpt_calibration_tokens": tokens})
    print(f"\n{shape_id(shape)} sparsegpt: {secs:.3f} s")


def test_summary_all_linears(results, copy_gbs):
    """Per decoder layer of SUMMARY_MODEL (every linear, weighted by how many the layer holds): total times,
    bandwidth fraction and the speedups the issue's goals are stated in."""
    rows = results.get("wanda_mask", [])
    per_layer = PER_LAYER.get(SUMMARY_MODEL, {"odd": 1, "wide": 1})
    summary = {"model": SUMMARY_MODEL, "summary": True, "per_layer_counts": per_layer}
    for pattern in PATTERNS:
        mrows = {r["linear"]: r for r in rows if r.get("model") == SUMMARY_MODEL and r.get("pattern") == pattern
                 and "triton_kernel_ms" in r}
        if set(mrows) != set(per_layer):
            pytest.skip(f"not every {SUMMARY_MODEL} linear was benchmarked for {pattern}")
        tot = {key: sum(per_layer[name] * mrows[name][key] for name in per_layer)
               for key in ("triton_kernel_ms", "triton_op_ms", "torch_twin_ms", "published_ms", "bytes_mask")}
        entry = {**tot, "kernel_frac_of_copy_bw": gbs(tot["bytes_mask"], tot["triton_kernel_ms"]) / copy_gbs,
                 "speedup_op_vs_twin": tot["torch_twin_ms"] / tot["triton_op_ms"],
                 "speedup_op_vs_published": tot["published_ms"] / tot["triton_op_ms"]}
        sg = {r["linear"]: r["sparsegpt_s"] for r in rows if r.get("model") == SUMMARY_MODEL and "sparsegpt_s" in r}
        if pattern == "unstructured-0.5" and set(sg) == set(per_layer):
            entry["sparsegpt_ms"] = 1e3 * sum(per_layer[name] * sg[name] for name in per_layer)
            entry["speedup_op_vs_sparsegpt"] = entry["sparsegpt_ms"] / tot["triton_op_ms"]
        summary[pattern] = entry
        print(f"\n{SUMMARY_MODEL} one layer, {pattern}: {entry}")
    results["wanda_mask"].append(summary)
