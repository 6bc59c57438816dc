"""Unstructured sparse weights (any sparsity, e.g. Wanda / SparseGPT / magnitude at 50-90%) in the CPU kernels'
layout: packing, its exact inverse, and `sparse_unstructured_linear_cpu`.

y = x Wᵀ (+ bias), W [N=out, K=in] with zeros anywhere. Layout (K_p = round_up(K, 16), the kernels' chunk):

* mask [N, K_p/8] uint8, a bitmask of the stored entries: bit j (value 1 << j) of byte b of row n is 1 iff
  W[n, 8b + j] != 0 (padding columns are 0). Two consecutive bytes are the 16-bit mask of one chunk.
* values, 1-D, the weight's dtype (float32 | bfloat16 for the kernels): the nonzeros of row 0 in column order, then
  row 1, ..., then 16 zero elements of padding (the vector loads read up to 16 elements from a chunk's start).
* row_offsets [N + 1] int64: row n's values are values[row_offsets[n] : row_offsets[n + 1]]; they let threads start
  at any row.
* Bytes per weight at sparsity s: (1 - s) of the dense bytes + 1 bit per weight (1/32 of fp32, 1/16 of bf16):
  0.53 of fp32 at 50%, 0.33 at 70%, 0.13 at 90%.

Entries equal to zero are not stored, so -0.0 unpacks as +0.0 (equal under ==, as F.linear sees it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.sparse24_cpu import cpu_isa, kernel_supported

CHUNK = 16  # columns per chunk: the kernels expand a chunk's stored values into one 16-lane register
VALUE_PADDING = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIT_WEIGHTS = 1 << torch.arange(8)


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


def pack_sparse_unstructured(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack weight [out, in] (zeros in place) into (values [nnz + 16], mask [out, K_p/8] uint8,
    row_offsets [out + 1] int64), the layout above. Exact: `unpack_sparse_unstructured` returns the same weight."""
    check_dense_weight(weight, "pack_sparse_unstructured")
    rows, cols = weight.shape
    k_p = cpu_padded_in(cols)
    w = F.pad(weight.detach(), (0, k_p - cols))
    nz = w != 0
    mask = (nz.view(rows, k_p // 8, 8).to(torch.int64) * _BIT_WEIGHTS.to(w.device)).sum(-1).to(torch.uint8)
    counts = nz.sum(1)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    values = torch.cat((w[nz], w.new_zeros(VALUE_PADDING)))  # boolean indexing is row-major: row by row, by column
    return values, mask.contiguous(), row_offsets


def check_packed_unstructured(values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                              out_features: int, in_features: int) -> None:
    """Raise ValueError unless the packed tensors have the shapes/dtypes of a packed [out_features, in_features]."""
    k_p = cpu_padded_in(in_features)
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (out_features, k_p // 8):
        raise ValueError(f"sparse unstructured: mask must be uint8 {(out_features, k_p // 8)}, got {mask.dtype} "
                         f"{tuple(mask.shape)} (pack with pack_sparse_unstructured)")
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (out_features + 1,):
        raise ValueError(f"sparse unstructured: row_offsets must be int64 [{out_features + 1}], got "
                         f"{row_offsets.dtype} {tuple(row_offsets.shape)}")
    if values.dim() != 1 or values.numel() < int(row_offsets[-1]) + VALUE_PADDING:
        raise ValueError(f"sparse unstructured: values must be 1-D with {int(row_offsets[-1])} nonzeros + "
                         f"{VALUE_PADDING} padding, got shape {tuple(values.shape)}")


def unpack_sparse_unstructured(values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                               out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_sparse_unstructured`: the dense weight [out_features, in_features] with zeros in place."""
    check_packed_unstructured(values, mask, row_offsets, out_features, in_features)
    bits = (mask.to(torch.int64).unsqueeze(-1) & _BIT_WEIGHTS.to(mask.device)) != 0
    nz = bits.reshape(out_features, -1)
    counts = nz.sum(1)
    bad = (counts != row_offsets[1:] - row_offsets[:-1]).nonzero()
    if bad.numel():
        r = int(bad[0])
        raise ValueError(f"sparse unstructured: row {r}: mask holds {int(counts[r])} entries but row_offsets "
                         f"give {int(row_offsets[r + 1] - row_offsets[r])}; the packed tensors are corrupt")
    w = torch.zeros(nz.shape, dtype=values.dtype, device=values.device)
    w[nz] = values[: int(row_offsets[-1])]
    return w[:, :in_features].contiguous()


def sparse_unstructured_linear_cpu_ref(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                       row_offsets: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                                       in_features: int) -> torch.Tensor:
    """Torch twin: F.linear of x [..., in] with the unpacked (dense-with-zeros) weight → [..., out], x's dtype."""
    w = unpack_sparse_unstructured(values, mask, row_offsets, out_features, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def sparse_unstructured_linear_cpu(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                   row_offsets: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                                   in_features: int, *, backend: str | None = None,
                                   isa: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias with W packed by `pack_sparse_unstructured`.

    x: [..., in_features] float32 | bfloat16 (any float dtype on the torch path); returns [..., out_features] in
    x's dtype, accumulated in fp32. backend: auto | cpu | torch (env SPARSEFAST_BACKEND). isa: auto | avx512 |
    avx2 | scalar (env SPARSEFAST_CPU_ISA). Threads: torch.get_num_threads(), split over output rows.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_unstructured_linear_cpu: x has {x.shape[-1]} features but in_features is "
                         f"{in_features}")
    check_packed_unstructured(values, mask, row_offsets, out_features, in_features)
    chosen = select_backend("sparse_unstructured_linear_cpu", x, backend, has=("cpu", "torch"),
                            cuda_ok=kernel_supported(x, values))
    if chosen == "torch":
        return sparse_unstructured_linear_cpu_ref(x, values, mask, row_offsets, bias, out_features, in_features)
    return torch.ops.sparsefast.sparse_unstructured_linear_cpu(x, values, mask, row_offsets, bias, out_features,
                                                               in_features, cpu_isa(isa))
