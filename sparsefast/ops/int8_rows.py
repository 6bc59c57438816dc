"""Symmetric per-output-row int8 weights: W[row, :] ≈ scales[row] · q[row, :], q in [-127, 127].

The one definition of the int8 weight format the CPU kernels run (csrc/cpu/linear_cpu.cpp: the int8 values are
widened to fp32 in registers, the row's fp32 sum of q·x is multiplied by its scale once) for every layout: dense
[out, in], 2:4 (sparsefast.ops.sparse24_cpu) and unstructured (sparsefast.ops.sparse_unstructured), whose packers
take q as they take a float weight (a zero stays a zero: q = 0 exactly where W = 0, so the sparsity pattern is kept).

Scale: max |W[row, :]| / 127 (the symmetric absmax rule of LLM.int8() / GPTQ's per-channel 8-bit grid); a row of
zeros gets scale 1 (q = 0). -128 is never used, so the grid is symmetric and negation commutes with quantization.
Activations (opt-in, `int8_activation_linear`): x quantized by the same rule per token and 32-column block (as
llama.cpp's Q8_0), integer dot products per block (the CPU kernels' AVX-512 VNNI path), blocks summed in fp32:
dynamic W8A8.
Bytes per weight: 1 (dense), 0.5 + 1/16 at 2:4 (values + 2-bit positions), 0.5 + 1/8 at 50% unstructured
(values + bitmask), against llama.cpp Q8_0's 34 bytes per 32 weights (1.0625).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127
ACTIVATION_BLOCK = 32  # input columns per activation scale (csrc/cpu/linear_cpu.h kActBlock)
SCALE_BUFFER = "weight_scale"  # a quantized nn.Linear's scales: a float32 buffer [out], saved as NAME.weight_scale


def int8_row_scales(weight: torch.Tensor) -> torch.Tensor:
    """float32 [out] scales of `weight` [out, in]: max |row| / 127, 1 for an all-zero row."""
    if weight.dim() != 2:
        raise ValueError(f"int8 rows: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))


def quantize_int8_rows(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales float32 [out]) with q = clamp(round(W / scale), ±127) (round half to even);
    `scales` default: int8_row_scales(weight)."""
    scales = int8_row_scales(weight) if scales is None else scales.float()
    if scales.shape != (weight.shape[0],):
        raise ValueError(f"int8 rows: scales must be [{weight.shape[0]}], got {tuple(scales.shape)}")
    q = torch.round(weight.detach().float() / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scales.contiguous()


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scales[row] · q[row, :] as `dtype` [out, in] (computed in float32)."""
    if q.dtype != torch.int8 or q.dim() != 2 or scales.shape != (q.shape[0],):
        raise ValueError(f"int8 rows: need q int8 [out, in] and scales [out], got {q.dtype} {tuple(q.shape)} and "
                         f"{tuple(scales.shape)}")
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, in], scales float32 [M, ceil(in / 32)]) of activations x [M, in]: `quantize_int8_rows`' rule per
    token and block of ACTIVATION_BLOCK columns (the last block padded with zeros), as llama.cpp's Q8_0 quantizes the
    activations it multiplies."""
    if x.dim() != 2:
        raise ValueError(f"int8 activations: x must be 2-D [tokens, in], got shape {tuple(x.shape)}")
    tokens, cols = x.shape
    blocks = -(-cols // ACTIVATION_BLOCK)
    padded = F.pad(x.detach().float(), (0, blocks * ACTIVATION_BLOCK - cols))
    q, scales = quantize_int8_rows(padded.reshape(tokens * blocks, ACTIVATION_BLOCK))
    return q.view(tokens, -1)[:, :cols], scales.view(tokens, blocks)


def dequantize_int8_activations(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [M, in]: each q times its block's scale (`quantize_int8_activations`' output back as the values the
    kernels multiply)."""
    return q.float() * scales.repeat_interleave(ACTIVATION_BLOCK, dim=1)[:, :q.shape[1]]


def int8_activation_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) with W = scales · q and x quantized by `quantize_int8_activations` (dynamic W8A8), in x's
    dtype: the torch twin of the CPU kernels' int8-activation path (csrc/cpu/linear_int8_act_cpu.cpp), as F.linear of
    the dequantized activations and weight in fp32. The kernels sum the same products exactly per block (int32) and
    the blocks in fp32, so the two differ by fp32 rounding only."""
    cols = q.shape[1]
    if x.shape[-1] != cols:
        raise ValueError(f"int8 activations: x has {x.shape[-1]} features, the weight {cols}")
    xd = dequantize_int8_activations(*quantize_int8_activations(x.reshape(-1, cols)))
    y = F.linear(xd, dequantize_int8_rows(q, scales), None if bias is None else bias.float())
    return y.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)


def quantized_modules(model: nn.Module) -> list[str]:
    """The names of `model`'s modules that hold int8 scales (a `weight_scale` buffer: `prune --quantize int8`)."""
    return [name for name, mod in model.named_modules() if getattr(mod, SCALE_BUFFER, None) is not None]


def refuse_quantized(model: nn.Module, what: str) -> None:
    """ValueError when `model` is int8-quantized: `what` would move its weights off their int8 grid (or cannot
    write the scales), so it needs the float model."""
    names = quantized_modules(model)
    if names:
        raise ValueError(f"{what} needs a float model, but this one is int8-quantized (prune --quantize int8: "
                         f"{len(names)} layers, e.g. {names[0]}); run it on the checkpoint from before --quantize, "
                         "then quantize")


def drop_int8_scales(model: nn.Module) -> list[str]:
    """Remove every `weight_scale` buffer from `model` (the weights keep their values, now plain float weights);
    returns the names of the modules that had one."""
    names = quantized_modules(model)
    for name in names:
        delattr(model.get_submodule(name), SCALE_BUFFER)
    return names
