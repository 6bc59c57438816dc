"""Triton kernel for Wanda's activation statistic: s_j += Σ_tokens x_j² over x [tokens, in], read once.
Torch twin: sparsefast.ops.sq_norm.sq_norm_accumulate_ref.

Two-stage and deterministic (no atomics): a grid of (column block, token split) programs; each streams its token
range in [BLOCK_T, BLOCK_C] tiles, accumulates x² in fp32 registers and writes one fp32 partial row per split.
The host then sums the [splits, in] partials in a fixed order (torch.sum) into the accumulator. Splits are chosen so
the grid fills the device a few times over; with few tokens there is one split and no second stage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32
BLOCK_C = 128
# input dtypes the kernel reads (it upcasts to fp32); others go to the torch twin
SUPPORTED_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sq_norm_partial_kernel(x_ptr, part_ptr, rows, cols, stride_r, stride_c, rows_per_split,
                            BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < cols
    r0 = split * rows_per_split
    r_end = tl.minimum(r0 + rows_per_split, rows)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t in range(r0, r_end, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        m = (offs_t < r_end)[:, None] & cmask[None, :]
        ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_r + offs_c[None, :] * stride_c
        x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(part_ptr + split.to(tl.int64) * cols + offs_c, tl.sum(acc, axis=0), mask=cmask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits so the two-stage path is exercised


def sq_norm_partials_triton(x2d: torch.Tensor) -> torch.Tensor:
    """Per-split column sums of x² for x2d [tokens, in] (fp32/fp16/bf16, any strides): fp32 [splits, in].

    Summing the result over dim 0 gives Σ_tokens x²; nothing is synchronised here.
    """
    rows, cols = x2d.shape
    col_blocks = triton.cdiv(cols, BLOCK_C)
    max_splits = max(1, triton.cdiv(rows, BLOCK_T))
    splits = max(1, min(max_splits, triton.cdiv(4 * _num_sms(x2d.device), col_blocks)))
    # whole BLOCK_T tiles per split, so only the last split has a ragged tail
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), BLOCK_T) * BLOCK_T if rows else BLOCK_T
    splits = max(1, triton.cdiv(rows, rows_per_split))
    part = torch.empty(splits, cols, dtype=torch.float32, device=x2d.device)
    if cols == 0:
        return part
    if rows == 0:
        return part.zero_()
    grid = (col_blocks, splits)
    _sq_norm_partial_kernel[grid](x2d, part, rows, cols, x2d.stride(0), x2d.stride(1), rows_per_split,
                                  BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=4)
    return part
