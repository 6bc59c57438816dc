"""Unstructured sparse weights (any sparsity, e.g. Wanda / SparseGPT / magnitude at 50-90%) in the CPU kernels'
layout: packing, its exact inverse, and `sparse_unstructured_linear_cpu`.

y = x Wᵀ (+ bias), W [N=out, K=in] with zeros anywhere. Layout: tiles of 8 output rows (N_p = round_up(N, 8)) and
chunks of 16 input columns (K_p = round_up(K, 16)); padding rows and columns are zeros, so they store nothing.

* mask [N_p/8, K_p/16, 8] int16 (read as uint16), a bitmask of the stored entries: bit j of mask[t, c, r] is 1 iff
  W[8t + r, 16c + j] != 0.
* values, 1-D, the weight's dtype (float32 | bfloat16 | int8 with per-row scales, sparsefast.ops.int8_rows, for the
  kernels): the nonzeros in the order tile, chunk, row,
  column (tile 0: chunk 0 of rows 0..7, chunk 1 of rows 0..7, ...; then tile 1, ...), then 16 zero elements of
  padding (the vector loads read up to 16 elements from a chunk's start). A tile is one sequential stream, which
  the hardware prefetcher follows far better than 8 interleaved row streams (ad-hoc timing on the 2-core AMD EPYC:
  1536x576 at 50% from DRAM, one thread, 106 µs tiled vs about 215 µs row by row).
* tile_offsets [N_p/8 + 1] int64: tile t's values start at values[tile_offsets[t]] (as many as its mask bits);
  they let threads start at any tile. Packed here, tile t + 1 starts where tile t ends (tile_offsets[t + 1]), and
  tile_offsets[-1] is the end of the last tile. A fused layer (sparsefast.nn.fused_linear: q/k/v, gate/up as one)
  joins its parts' value tensors whole, so between one part's last tile and the next part's first lie the first
  part's 16 zeros of padding: a tile may end before the next one starts, the gap holding zeros only.
* Bytes per weight at sparsity s: (1 - s) of the dense bytes + 1 bit per weight (1/32 of fp32, 1/16 of bf16):
  0.53 of fp32 at 50%, 0.33 at 70%, 0.13 at 90%; int8 at 50%: 0.625 bytes per weight.

The kernels expand a chunk's stored values into one 16-lane register per row (AVX-512 vexpandps, or an AVX2 permute
table per 8 columns; int8 / bf16 with AVX-512 VBMI: one expand for 4 / 2 adjacent rows, then one widening permute per
row). Entries equal to zero are not stored, so -0.0 unpacks as +0.0 (equal under ==, as F.linear
sees it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.sparse24_cpu import check_scales, cpu_isa, kernel_supported, linear_ref

CHUNK = 16  # columns per chunk: the kernels expand a chunk's stored values into one 16-lane register
TILE_ROWS = 8
VALUE_PADDING = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIT_WEIGHTS = 1 << torch.arange(CHUNK)


def cpu_padded_in(in_features: int) -> int:
    """K_p: in_features rounded up to the 16-column chunk."""
    return -(-in_features // CHUNK) * CHUNK


def check_dense_weight(weight: torch.Tensor, op: str) -> None:
    """Raise ValueError unless `weight` is a non-empty 2-D float [out, in] tensor."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{op}: weight must be a non-empty 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"{op}: weight dtype {weight.dtype} unsupported; use float32, bfloat16 or float16")


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries of `weight`."""
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def _tiles(out_features: int) -> int:
    return -(-out_features // TILE_ROWS)


def pack_sparse_unstructured(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack weight [out, in] (zeros in place) into (values [nnz + 16], mask [N_p/8, K_p/16, 8] int16,
    tile_offsets [N_p/8 + 1] int64), the layout above; an int8 weight (quantized, sparsefast.ops.int8_rows) packs
    as it is. Exact: `unpack_sparse_unstructured` returns the same weight."""
    check_dense_weight(weight.float() if weight.dtype == torch.int8 else weight, "pack_sparse_unstructured")
    rows, cols = weight.shape
    tiles, k_p = _tiles(rows), cpu_padded_in(cols)
    w = F.pad(weight.detach(), (0, k_p - cols, 0, tiles * TILE_ROWS - rows))
    w = w.view(tiles, TILE_ROWS, k_p // CHUNK, CHUNK).transpose(1, 2).contiguous()  # [tile, chunk, row, column]
    nz = w != 0
    word = (nz.to(torch.int32) << torch.arange(CHUNK, dtype=torch.int32, device=w.device)).sum(-1)  # < 2**16
    mask = (word - ((word >> 15) << 16)).to(torch.int16)  # the uint16 bit pattern as int16
    tile_offsets = torch.zeros(tiles + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(nz.flatten(1).sum(1), 0, out=tile_offsets[1:])
    values = torch.cat((w[nz], w.new_zeros(VALUE_PADDING)))  # boolean indexing is in memory order
    return values, mask, tile_offsets


def check_packed_unstructured(values: torch.Tensor, mask: torch.Tensor, tile_offsets: torch.Tensor,
                              out_features: int, in_features: int) -> None:
    """Raise ValueError unless the packed tensors have the shapes/dtypes of a packed [out_features, in_features]."""
    tiles, chunks = _tiles(out_features), cpu_padded_in(in_features) // CHUNK
    if mask.dtype != torch.int16 or tuple(mask.shape) != (tiles, chunks, TILE_ROWS):
        raise ValueError(f"sparse unstructured: mask must be int16 {(tiles, chunks, TILE_ROWS)}, got {mask.dtype} "
                         f"{tuple(mask.shape)} (pack with pack_sparse_unstructured)")
    if tile_offsets.dtype != torch.int64 or tuple(tile_offsets.shape) != (tiles + 1,):
        raise ValueError(f"sparse unstructured: tile_offsets must be int64 [{tiles + 1}], got "
                         f"{tile_offsets.dtype} {tuple(tile_offsets.shape)}")
    if values.dim() != 1 or values.numel() < int(tile_offsets[-1]) + VALUE_PADDING:
        raise ValueError(f"sparse unstructured: values must be 1-D with {int(tile_offsets[-1])} nonzeros + "
                         f"{VALUE_PADDING} padding, got shape {tuple(values.shape)}")


def unpack_sparse_unstructured(values: torch.Tensor, mask: torch.Tensor, tile_offsets: torch.Tensor,
                               out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_sparse_unstructured`: the dense weight [out_features, in_features] with zeros in place."""
    check_packed_unstructured(values, mask, tile_offsets, out_features, in_features)
    nz = (mask.to(torch.int64).unsqueeze(-1) & _BIT_WEIGHTS.to(mask.device)) != 0  # [tile, chunk, row, column]
    counts = nz.flatten(1).sum(1)
    room = tile_offsets[1:] - tile_offsets[:-1]
    if bool((counts == room).all()) and int(tile_offsets[0]) == 0:  # as packed: the tiles back to back
        stored = values[: int(tile_offsets[-1])]
    else:  # a fused layer's: each tile's values from its start, zeros (a part's padding) up to the next tile's
        bad = counts > room
        where = (torch.repeat_interleave(tile_offsets[:-1] - (torch.cumsum(counts, 0) - counts), counts)
                 + torch.arange(int(counts.sum()), device=counts.device))
        if not bool(bad.any()):
            stray = values[: int(tile_offsets[-1])] != 0
            stray[where] = False
            bad[torch.searchsorted(tile_offsets, stray.nonzero().flatten(), right=True) - 1] = True
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            raise ValueError(f"sparse unstructured: tile {t} (rows {TILE_ROWS * t}..{TILE_ROWS * t + TILE_ROWS - 1}"
                             f"): mask holds {int(counts[t])} entries but tile_offsets give {int(room[t])} values "
                             f"(more only with zeros after the tile's own); the packed tensors are corrupt")
        stored = values[where]
    w = torch.zeros(nz.shape, dtype=values.dtype, device=values.device)
    w[nz] = stored
    w = w.transpose(1, 2).reshape(nz.shape[0] * TILE_ROWS, -1)
    return w[:out_features, :in_features].contiguous()


def sparse_unstructured_linear_cpu_ref(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                       tile_offsets: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                                       in_features: int, scales: torch.Tensor | None = None,
                                       int8_activations: bool = False) -> torch.Tensor:
    """Torch twin: `linear_ref` of x [..., in] with the unpacked (dense-with-zeros) weight → [..., out], x's dtype."""
    return linear_ref(x, unpack_sparse_unstructured(values, mask, tile_offsets, out_features, in_features), bias,
                      scales, int8_activations)


def sparse_unstructured_linear_cpu(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                   tile_offsets: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                                   in_features: int, *, scales: torch.Tensor | None = None,
                                   int8_activations: bool = False, backend: str | None = None,
                                   isa: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias with W packed by `pack_sparse_unstructured` (int8 values: W = scales[row] · values, `scales`
    float32 [out_features]; `int8_activations`: x quantized per token and block, int8_rows.int8_activation_linear).

    x: [..., in_features] float32 | bfloat16 (any float dtype on the torch path); returns [..., out_features] in
    x's dtype, accumulated in fp32. backend: auto | cpu | torch (env SPARSEFAST_BACKEND). isa: auto | avx512vbmi |
    avx512 | avx2 | scalar (env SPARSEFAST_CPU_ISA; avx512vbmi expands int8 and bf16 values several rows at a
    time). Threads: torch.get_num_threads(), split over tiles of output rows.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_unstructured_linear_cpu: x has {x.shape[-1]} features but in_features is "
                         f"{in_features}")
    check_packed_unstructured(values, mask, tile_offsets, out_features, in_features)
    check_scales(values, scales, out_features, int8_activations)
    chosen = select_backend("sparse_unstructured_linear_cpu", x, backend, has=("cpu", "torch"),
                            cuda_ok=kernel_supported(x, values, int8_activations, isa))
    if chosen == "torch":
        return sparse_unstructured_linear_cpu_ref(x, values, mask, tile_offsets, bias, out_features, in_features,
                                                  scales, int8_activations)
    return torch.ops.sparsefast.sparse_unstructured_linear_cpu(x, values, mask, tile_offsets, bias, out_features,
                                                               in_features, cpu_isa(isa), scales, int8_activations)
