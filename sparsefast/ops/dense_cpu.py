"""Dense linears on the CPU for few tokens: `dense_linear_cpu`, sparsefast's GEMV kernel, and `linear_cpu`, the route
every dense CPU linear of a served model takes (the kernel where it wins, torch's F.linear elsewhere).

y = x Wᵀ (+ bias) with W [out, in] exactly as nn.Linear stores it (row-major; a view with a row stride, e.g. of a
tied embedding, too): no packing and no copy, so swapping the kernel in costs no memory. The kernel
(csrc/cpu/linear_cpu.cpp) reads 8 rows side by side and prefetches the next 8 into L2; bf16 weights are widened to
fp32 in registers and accumulated in fp32 (the sparse kernels' convention), x is read as fp32.

Why a kernel of our own for a dense GEMV: in a batch-1 decode step every weight comes from DRAM once, and torch's
F.linear read it at 26 GB/s in fp32 and 11 GB/s in bf16 (oneDNN's bf16 path is built for larger M), where a plain
read of the same memory runs at 28 GB/s; the kernel reads at 28-30 GB/s in both, so bf16 weights finally halve
the time of the linears. Ad-hoc layer walks on a 2-core Xeon with AMX (all 210 SmolLM2-135M linears of 30 layers,
weights from DRAM), kernel vs F.linear: fp32 1.03x at M = 1, 1.48x at 4, 1.28x at 8, 1.15x at 16, 0.85x at 32; bf16
2.3x at 1, 1.4x at 4, 1.08x at 8, 0.64x at 16 (oneDNN's AMX GEMM takes over). Hence DENSE_KERNEL_MAX_TOKENS = 8.
Per linear, each call's weight from DRAM (the `dense-kernel` variant of bench/micro/bench_sparse_cpu.py, committed:
bench/results/2026-12-05-cpu-sparse-linear-smollm2-2t.json, same Xeon), over the 4 SmolLM2 shapes: fp32 0.86-1.01x
at M = 1, 1.08-1.43x at 4, 1.00-1.27x at 8, 0.96-1.10x at 16; bf16 1.70-1.91x, 1.30-1.52x, 0.99-1.19x, 0.65-0.96x.
"""

from __future__ import annotations

from typing import Callable

import torch

from sparsefast._ext import load_cpu_extension
from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.int8_rows import int8_activation_linear
from sparsefast.ops.sparse24_cpu import (
    KERNEL_DTYPES,
    VALUE_DTYPES,
    check_scales,
    cpu_isa,
    int8_activation_kernels,
    linear_ref,
)

DENSE_KERNEL_MAX_TOKENS = 8  # M above this runs F.linear (oneDNN / MKL GEMMs win there; module docstring)


def dense_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the dense kernel takes x [..., in] and weight [out, in], the extension aside: CPU tensors, fp32/bf16
    x, an fp32/bf16 (or int8, run with its scales) weight with unit column stride, at most DENSE_KERNEL_MAX_TOKENS
    tokens. Tensor properties only, so torch.compile traces it."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in KERNEL_DTYPES
            and weight.dtype in VALUE_DTYPES and weight.dim() == 2 and weight.stride(1) == 1
            and x.numel() <= DENSE_KERNEL_MAX_TOKENS * max(x.shape[-1], 1))


def dense_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_cpu` / `dense_route` run the kernel: `dense_kernel_fits` and the CPU extension loaded."""
    return dense_kernel_fits(x, weight) and load_cpu_extension()


def dense_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     scales: torch.Tensor | None = None, int8_activations: bool = False, backend: str | None = None,
                     isa: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias through the dense CPU kernel, any M (`linear_cpu` is the route that limits it to the M where
    it wins). x: [..., in] float32 | bfloat16; weight [out, in] float32 | bfloat16 | int8 with per-row `scales`
    (float32 [out], W = scales[row] · weight; sparsefast.ops.int8_rows; `int8_activations`: x quantized per token
    and block, int8_rows.int8_activation_linear), unit column stride; returns
    [..., out] in x's dtype, accumulated in fp32. backend: auto | cpu | torch (env SPARSEFAST_BACKEND); isa (cpu
    backend): auto | avx512vbmi | avx512 | avx2 | scalar (env SPARSEFAST_CPU_ISA). Threads: torch.get_num_threads()."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"dense_linear_cpu: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)} "
                         "([out, in])")
    check_scales(weight, scales, weight.shape[0], int8_activations)
    ok = (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in KERNEL_DTYPES
          and weight.dtype in VALUE_DTYPES and weight.stride(1) == 1
          and (not int8_activations or int8_activation_kernels(isa)))
    chosen = select_backend("dense_linear_cpu", x, backend, has=("cpu", "torch"), cuda_ok=ok)
    if chosen == "torch":
        return dense_linear_cpu_ref(x, weight, bias, scales, int8_activations)
    return torch.ops.sparsefast.dense_linear_cpu(x, weight, bias, cpu_isa(isa), scales, int8_activations)


def dense_linear_cpu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         scales: torch.Tensor | None = None, int8_activations: bool = False) -> torch.Tensor:
    """Torch twin: `linear_ref` (F.linear in x's dtype, an int8 weight dequantized with its per-row scales first;
    int8 activations: int8_rows.int8_activation_linear)."""
    return linear_ref(x, weight, bias, scales, int8_activations)


DenseCall = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def dense_route(x: torch.Tensor, weight: torch.Tensor) -> DenseCall:
    """(x, weight, bias) -> y for inputs like `x` on float weights like `weight`, decided now: the kernel (its
    instruction set fixed now) where `dense_kernel_takes`, else the torch twin (an int8 weight needs its scales:
    dense_layer_route). Modules decide it once per input size and keep it: the decision's
    per-call Python would cost a fair part of a small layer's time, and torch.compile cannot trace
    load_cpu_extension (the compiled step reads the kept routes)."""
    if weight.dtype == torch.int8:
        raise ValueError(f"dense_route: a {weight.dtype} weight needs its scales; use dense_linear_cpu(x, q, "
                         "scales=...) (sparsefast.nn.dense_linear.DenseCpuLinear runs int8 layers)")
    if dense_kernel_takes(x, weight):
        op, isa = torch.ops.sparsefast.dense_linear_cpu.default, cpu_isa()
        return lambda x, weight, bias: op(x, weight, bias, isa, None, False)
    return dense_linear_cpu_ref


def dense_layer_route(x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor | None = None,
                      scales: torch.Tensor | None = None, int8_activations: bool = False) -> DenseCall:
    """The dense route of a layer whose float weight is `weight` and, for an int8-quantized layer, whose int8 values
    are `q` with per-row `scales` (weight = scales · q): (x, weight, bias) -> y for inputs like `x`, decided now. The
    int8 kernel on q (the captured q, not the weight passed) where `dense_kernel_takes` it, else `dense_route` on the
    float weight: the one rule of DenseCpuLinear, SparseLinear's dense rows and the calibration's dense baseline.
    `int8_activations` (an int8 layer): x quantized per token and block, through the kernel where it runs, else the
    torch twin (int8_rows.int8_activation_linear) on q, never the float weight."""
    if int8_activations and q is None:
        raise ValueError("dense_layer_route: int8 activations need an int8 layer (q and scales)")
    if q is not None and dense_kernel_takes(x, q) and (not int8_activations or int8_activation_kernels()):
        op, isa, row_scales = torch.ops.sparsefast.dense_linear_cpu.default, cpu_isa(), scales.float()
        return lambda x, weight, bias: op(x, q, bias, isa, row_scales, int8_activations)
    if int8_activations:
        row_scales = scales.float()
        return lambda x, weight, bias: int8_activation_linear(x, q, row_scales, bias)
    return dense_route(x, weight)


def dense_layer_reads(x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor | None = None,
                      scales: torch.Tensor | None = None, int8_activations: bool = False) -> list[torch.Tensor]:
    """The weight tensors `dense_layer_route` reads for inputs like `x` (decode bandwidth accounting)."""
    return [q, scales] if q is not None and (int8_activations or dense_kernel_takes(x, q)) else [weight]


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dense route of a CPU linear for this one call: the kernel where `dense_kernel_takes`, else F.linear (x's
    dtype)."""
    return dense_route(x, weight)(x, weight, bias)
