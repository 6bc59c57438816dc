"""Activation-norm microbenchmark: Σ_tokens x² per input channel for one calibration batch (8 × 2048 tokens, bf16)
at every LLaMA input width — the triton two-stage kernel vs the torch twin, timed in one run.

- triton_kernel_ms: the partial-sum kernel alone (no host sync); triton_op_ms: sparsefast.ops.sq_norm_accumulate
  (kernel + deterministic second stage + finiteness check with one sync); torch_twin_ms: sq_norm_accumulate_ref.
Bytes: x read once (the accumulator traffic is negligible).
"""

from __future__ import annotations

import pytest
import torch

from sparsefast.bench.memory import gbs
from sparsefast.bench.shapes import bench_shapes, quick_mode
from sparsefast.bench.timing import time_ms
from sparsefast.kernels.sq_norm import sq_norm_partials_triton
from sparsefast.ops.sq_norm import sq_norm_accumulate, sq_norm_accumulate_ref

TOKENS = 40 if quick_mode() else 8 * 2048
WIDTHS = sorted({inn for _, _, _, inn in bench_shapes()})


@pytest.mark.parametrize("width", WIDTHS)
def test_sq_norm(benchmark, width, results, copy_gbs, device):
    g = torch.Generator(device=device).manual_seed(width)
    x = torch.randn(TOKENS, width, device=device, generator=g).to(torch.bfloat16)
    acc = torch.zeros(width, device=device)
    benchmark(lambda: sq_norm_accumulate(acc, x, backend="triton"))
    exact = (x.double() ** 2).sum(0)
    got = torch.zeros(width, device=device)
    sq_norm_accumulate(got, x, backend="triton")
    assert torch.allclose(got.double(), exact, rtol=1e-4), "triton norms differ from fp64: timings meaningless"
    row = {"tokens": TOKENS, "in": width, "dtype": "bfloat16",
           "triton_kernel_ms": time_ms(lambda: sq_norm_partials_triton(x)),
           "triton_op_ms": time_ms(lambda: sq_norm_accumulate(acc, x, backend="triton")),
           "torch_twin_ms": time_ms(lambda: sq_norm_accumulate_ref(acc, x), warmup_ms=5, rep_ms=30)}
    nbytes = x.numel() * x.element_size()
    row["bytes"] = nbytes
    row["triton_kernel_gbs"] = gbs(nbytes, row["triton_kernel_ms"])
    row["kernel_frac_of_copy_bw"] = row["triton_kernel_gbs"] / copy_gbs
    row["speedup_op_vs_twin"] = row["torch_twin_ms"] / row["triton_op_ms"]
    results.setdefault("sq_norm", []).append(row)
    print(f"\nsq_norm [{TOKENS}, {width}]: kernel {row['triton_kernel_ms']:.3f} ms "
          f"({row['triton_kernel_gbs']:.0f} GB/s, {100 * row['kernel_frac_of_copy_bw']:.0f}% of copy), "
          f"op {row['triton_op_ms']:.3f} ms, twin {row['torch_twin_ms']:.3f} ms")
