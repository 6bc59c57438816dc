"""2:4 sparse weights in the CPU kernels' layout: packing, its exact inverse, and `sparse24_linear_cpu`.

y = x Wᵀ (+ bias), W [N=out, K=in] 2:4 sparse along K (every 4-group of a row holds at most 2 nonzeros; Mishra et
al. 2021). The CUDA layout of sparsefast.ops.sparse24 is ordered for mma.sp fragments; this one is ordered for a CPU
that streams the weight once per call (csrc/cpu/linear_cpu.cpp).

Layout: tiles of 8 output rows × 32 input columns. N_p = round_up(N, 8), K_p = round_up(K, 32); rows and columns of
padding are zeros. A block of 32 columns holds 8 groups of 4; each group keeps 2 positions.

* Kept positions: as for CUDA (`sparse24._kept_positions`): in each 4-group the positions of its nonzeros, completed
  with the lowest zero positions, ascending: i0 < i1.
* values [N_p/8, K_p/32, 8, 16], the weight's dtype (float32 | bfloat16 | int8 for the kernels; int8 values come with
  per-row float32 scales, sparsefast.ops.int8_rows):
  values[t, b, r, 2g + s] = W[8t + r, 32b + 4g + i_s]. In memory: tile by tile, in a tile block by block, in a
  block row by row: the 8 rows of a tile are one sequential stream.
* meta [N_p/8, K_p/32, 8] int32 (read as uint32): bits 2j and 2j + 1 of meta[t, b, r] hold the position i (0..3)
  of value j = 2g + s within its group, i.e. meta = Σ_j i_j << 2j. Two bits per stored value, the compact
  positions of NVIDIA's 2:4 metadata, and exactly what the kernel needs: a variable shift and a mask turn the word
  into the 16 column indices 4g + i_s of a two-source permute of x (AVX-512 vpermt2ps), so x is gathered onto the
  stored values and W is never expanded.
* Bytes per weight: values 1/2 + meta 1/32 of fp32 (0.531: decode ceiling 1.88x), 1/2 + 1/16 of bf16 (0.5625),
  1/2 + 1/8 of int8 (0.625 bytes: 0.59 of llama.cpp's Q8_0).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from sparsefast._ext import load_cpu_extension
from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.int8_rows import dequantize_int8_rows, int8_activation_linear
from sparsefast.ops.sparse24 import _kept_positions, check_sparse24

TILE_ROWS, BLOCK_COLS = 8, 32  # the 2:4 layout's tile
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activations, and float weights
VALUE_DTYPES = (*KERNEL_DTYPES, torch.int8)  # stored weights: int8 with per-row scales (sparsefast.ops.int8_rows)
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512vbmi": 4}  # csrc/cpu/linear_cpu.h, enum Isa
ISA_NAMES = {code: name for name, code in ISAS.items()}
ISA_ENV = "SPARSEFAST_CPU_ISA"


def sparse24_cpu_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(tiles, blocks) of the 2:4 layout: N_p/8 and K_p/32."""
    return -(-out_features // TILE_ROWS), -(-in_features // BLOCK_COLS)


_POSITION_SHIFTS = 2 * torch.arange(16)


def cpu_isa(isa: str | None = None) -> int:
    """The instruction-set code the kernels get: `isa` or $SPARSEFAST_CPU_ISA (auto | avx512vbmi |
    avx512 | avx2 | scalar; avx512vbmi: AVX-512 with VBMI/VBMI2, the best level on Ice Lake, Zen 4 and later)."""
    name = isa or os.environ.get(ISA_ENV, "auto") or "auto"
    if name not in ISAS:
        raise ValueError(f"CPU kernels: unknown instruction set {name!r}; choose one of {', '.join(ISAS)}")
    return ISAS[name]


def pack_sparse24_cpu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4-sparse weight [out, in] into (values [N_p/8, K_p/32, 8, 16] same dtype, meta [N_p/8, K_p/32, 8]
    int32), the layout above; an int8 weight (quantized, sparsefast.ops.int8_rows) packs as it is. Raises ValueError
    naming the first row/group with more than 2 nonzeros. Exact: `unpack_sparse24_cpu` returns the same weight."""
    check_sparse24(weight.float() if weight.dtype == torch.int8 else weight)
    rows, cols = weight.shape
    tiles, blocks = sparse24_cpu_shape(rows, cols)
    w = F.pad(weight.detach(), (0, blocks * BLOCK_COLS - cols, 0, tiles * TILE_ROWS - rows))
    w = w.view(tiles * TILE_ROWS, blocks * 8, 4)
    idx = _kept_positions(w)  # [N_p, K_p/4, 2]
    values = torch.gather(w, 2, idx).view(tiles, TILE_ROWS, blocks, 16).transpose(1, 2).contiguous()
    pos = idx.view(tiles, TILE_ROWS, blocks, 16).transpose(1, 2).to(torch.int64)
    word = (pos << _POSITION_SHIFTS.to(pos.device)).sum(-1)  # < 2**32: the uint32 bit pattern
    meta = (word - ((word >> 31) << 32)).to(torch.int32).contiguous()  # as int32, same bits
    return values, meta


def check_packed_sparse24_cpu(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> None:
    """Raise ValueError unless (values, meta) have the shapes and dtypes of a packed [out_features, in_features]."""
    tiles, blocks = sparse24_cpu_shape(out_features, in_features)
    if tuple(values.shape) != (tiles, blocks, TILE_ROWS, 16):
        raise ValueError(f"sparse24 cpu: values shape {tuple(values.shape)} does not match a {out_features}x"
                         f"{in_features} weight; expected {(tiles, blocks, TILE_ROWS, 16)} (pack with "
                         "pack_sparse24_cpu)")
    if meta.dtype != torch.int32 or tuple(meta.shape) != (tiles, blocks, TILE_ROWS):
        raise ValueError(f"sparse24 cpu: meta must be int32 {(tiles, blocks, TILE_ROWS)}, got {meta.dtype} "
                         f"{tuple(meta.shape)} (pack with pack_sparse24_cpu)")


def unpack_sparse24_cpu(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_sparse24_cpu`: the dense weight [out_features, in_features] with zeros in place."""
    check_packed_sparse24_cpu(values, meta, out_features, in_features)
    tiles, blocks = sparse24_cpu_shape(out_features, in_features)
    pos = (meta.to(torch.int64).unsqueeze(-1) >> _POSITION_SHIFTS.to(meta.device)) & 3  # [tiles, blocks, 8, 16]
    pos = pos.transpose(1, 2).reshape(tiles * TILE_ROWS, blocks * 8, 2)  # [N_p, K_p/4, 2]
    bad = (pos[..., 0] >= pos[..., 1]).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"sparse24 cpu: meta row {r}, group {g} does not hold 2 ascending positions; "
                         "the packed tensors are corrupt")
    vals = values.transpose(1, 2).reshape(tiles * TILE_ROWS, blocks * 8, 2)
    w = torch.zeros(tiles * TILE_ROWS, blocks * 8, 4, dtype=values.dtype, device=values.device)
    w.scatter_(2, pos, vals)
    return w.view(tiles * TILE_ROWS, -1)[:out_features, :in_features].contiguous()


def sparse24_linear_cpu_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                            out_features: int, in_features: int, scales: torch.Tensor | None = None,
                            int8_activations: bool = False) -> torch.Tensor:
    """Torch twin: `linear_ref` of x [..., in] with the unpacked (dense-with-zeros) weight → [..., out], x's dtype."""
    return linear_ref(x, unpack_sparse24_cpu(values, meta, out_features, in_features), bias, scales,
                      int8_activations)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scales: torch.Tensor | None = None, int8_activations: bool = False) -> torch.Tensor:
    """The CPU kernels' torch twin on a dense-with-zeros weight [out, in]: F.linear in x's dtype, an int8 weight
    dequantized with its per-row `scales` first; with `int8_activations` (int8 weights only) x quantized per token
    and block first (sparsefast.ops.int8_rows.int8_activation_linear)."""
    check_scales(weight, scales, weight.shape[0], int8_activations)
    if int8_activations:
        return int8_activation_linear(x, weight, scales, bias)
    w = dequantize_int8_rows(weight, scales) if scales is not None else weight
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_scales(values: torch.Tensor, scales: torch.Tensor | None, out_features: int,
                 int8_activations: bool = False) -> None:
    """ValueError unless int8 `values` come with float32 `scales` [out_features] and float values with none (and
    without int8 activations, which need int8 weights)."""
    if int8_activations and values.dtype != torch.int8:
        raise ValueError(f"CPU linear: int8 activations need int8 weights (prune --quantize int8); these values are "
                         f"{values.dtype}")
    if values.dtype != torch.int8:
        if scales is not None:
            raise ValueError(f"CPU linear: scales are for int8 values only; these values are {values.dtype}")
        return
    if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (out_features,):
        got = "none" if scales is None else f"{scales.dtype} {tuple(scales.shape)}"
        raise ValueError(f"CPU linear: int8 values need float32 scales [{out_features}] (one per output row), got "
                         f"{got}; quantize with sparsefast.ops.int8_rows.quantize_int8_rows")


def kernel_supported(x: torch.Tensor, values: torch.Tensor, int8_activations: bool = False,
                     isa: str | None = None) -> bool:
    """Whether the CPU kernels take this case (CPU tensors, fp32/bf16 activations, fp32/bf16/int8 weights; int8
    activations at the avx512vbmi level only: `isa`, else $SPARSEFAST_CPU_ISA or the best), the extension aside."""
    return (x.device.type == "cpu" and values.device.type == "cpu" and x.dtype in KERNEL_DTYPES
            and values.dtype in VALUE_DTYPES and (not int8_activations or int8_activation_kernels(isa)))


def int8_activation_kernels(isa: str | None = None) -> bool:
    """Whether the int8-activation kernels run at `isa` (default $SPARSEFAST_CPU_ISA, else this CPU's best): they
    exist at avx512vbmi only (AVX-512 VNNI + VBMI: Ice Lake, Zen 4 and later); elsewhere the torch twin runs.
    False without the CPU extension."""
    code = cpu_isa(isa)
    if code == ISAS["auto"]:
        code = best_cpu_isa()
    return code == ISAS["avx512vbmi"]


@functools.lru_cache(maxsize=None)
def best_cpu_isa() -> int:
    """The best instruction-set code this CPU runs the kernels at (csrc/cpu/linear_cpu.cpp best_isa); 0 without the
    CPU extension."""
    return int(torch.ops.sparsefast.cpu_best_isa()) if load_cpu_extension() else ISAS["auto"]


def sparse24_linear_cpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int, in_features: int, *, scales: torch.Tensor | None = None,
                        int8_activations: bool = False, backend: str | None = None,
                        isa: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias with W packed by `pack_sparse24_cpu` (int8 values: W = scales[row] · values, `scales` float32
    [out_features]; `int8_activations`: x quantized per token and block, int8_rows.int8_activation_linear).

    x: [..., in_features] float32 | bfloat16 (any float dtype on the torch path); returns [..., out_features] in
    x's dtype, accumulated in fp32. backend: auto | cpu | torch (env SPARSEFAST_BACKEND). isa (cpu backend): auto |
    avx512vbmi | avx512 | avx2 | scalar (env SPARSEFAST_CPU_ISA). Threads: torch.get_num_threads(), split over
    output rows.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse24_linear_cpu: x has {x.shape[-1]} features but in_features is {in_features}")
    check_packed_sparse24_cpu(values, meta, out_features, in_features)
    check_scales(values, scales, out_features, int8_activations)
    chosen = select_backend("sparse24_linear_cpu", x, backend, has=("cpu", "torch"),
                            cuda_ok=kernel_supported(x, values, int8_activations, isa))
    if chosen == "torch":
        return sparse24_linear_cpu_ref(x, values, meta, bias, out_features, in_features, scales, int8_activations)
    return torch.ops.sparsefast.sparse24_linear_cpu(x, values, meta, bias, out_features, in_features, cpu_isa(isa),
                                                    scales, int8_activations)
