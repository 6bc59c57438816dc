"""2:4 sparse weights in the CPU kernels' layout: packing, its exact inverse, and `sparse24_linear_cpu`.

y = x Wᵀ (+ bias), W [N=out, K=in] 2:4 sparse along K (every 4-group of a row holds at most 2 nonzeros; Mishra et
al. 2021). The CUDA layout of sparsefast.ops.sparse24 is ordered for mma.sp fragments; a CPU reads rows, so this one
is row-major and the kernels (csrc/cpu/sparse_linear_cpu.cpp) stream each row once.

Layout (K_p = round_up(K, 16): the kernels work in 16-column chunks; the padding columns are zeros):

* Kept positions: as for CUDA (`sparse24._kept_positions`): in each 4-group the positions of its nonzeros, completed
  with the lowest zero positions, ascending: i0 < i1.
* values [N, K_p/2], the weight's dtype (float32 | bfloat16 for the kernels): values[n, 2g + s] = W[n, 4g + i_s].
* meta [N, K_p/8] uint8, the bitmask of kept columns: bit j (value 1 << j) of byte b of row n is 1 iff dense column
  8b + j is a kept position, so the low nibble is group 2b (bits 0-3 = positions 0-3) and the high nibble group
  2b + 1, each with exactly 2 bits set (1 << i0 | 1 << i1). That is 4 bits per group, as compact as two 2-bit
  positions (6 possible pairs need 3 bits at least, and nibbles keep every group byte-aligned), and it is the very
  mask the unstructured layout uses, so one kernel expands both: a 16-column chunk = 8 values + 2 meta bytes, and
  vexpandps (AVX-512) or a permute table (AVX2) puts the 8 values at their columns without any decoding table.
* Bytes per weight: values 1/2 + meta 1/32 of fp32 (0.531: decode ceiling 1.88x), 1/2 + 1/16 of bf16 (0.5625).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.sparse24 import _kept_positions, check_sparse24

CHUNK = 16
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_ENV = "SPARSEFAST_CPU_ISA"


def cpu_padded_in(in_features: int) -> int:
    """K_p: in_features rounded up to the kernels' 16-column chunk."""
    return -(-in_features // CHUNK) * CHUNK


def cpu_isa(isa: str | None = None) -> int:
    """The instruction-set code the kernels get: `isa` or $SPARSEFAST_CPU_ISA (auto | avx512 | avx2 | scalar)."""
    name = isa or os.environ.get(ISA_ENV, "auto") or "auto"
    if name not in ISAS:
        raise ValueError(f"CPU kernels: unknown instruction set {name!r}; choose one of {', '.join(ISAS)}")
    return ISAS[name]


def pack_sparse24_cpu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4-sparse weight [out, in] into (values [out, K_p/2] same dtype, meta [out, K_p/8] uint8), the layout
    above. Raises ValueError naming the first row/group with more than 2 nonzeros. Exact: `unpack_sparse24_cpu`
    returns the same weight."""
    check_sparse24(weight)
    rows, cols = weight.shape
    k_p = cpu_padded_in(cols)
    w = F.pad(weight.detach(), (0, k_p - cols)).view(rows, k_p // 4, 4)
    idx = _kept_positions(w)  # [rows, K_p/4, 2]
    values = torch.gather(w, 2, idx).reshape(rows, k_p // 2).contiguous()
    nib = (1 << idx[..., 0]) | (1 << idx[..., 1])  # [rows, K_p/4] int64: the kept-position mask of each group
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return values, meta


def check_packed_sparse24_cpu(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> None:
    """Raise ValueError unless (values, meta) have the shapes and dtypes of a packed [out_features, in_features]."""
    k_p = cpu_padded_in(in_features)
    if values.dim() != 2 or tuple(values.shape) != (out_features, k_p // 2):
        raise ValueError(f"sparse24 cpu: values shape {tuple(values.shape)} does not match a {out_features}x"
                         f"{in_features} weight; expected {(out_features, k_p // 2)} (pack with pack_sparse24_cpu)")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (out_features, k_p // 8):
        raise ValueError(f"sparse24 cpu: meta must be uint8 {(out_features, k_p // 8)}, got {meta.dtype} "
                         f"{tuple(meta.shape)} (pack with pack_sparse24_cpu)")


def unpack_sparse24_cpu(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_sparse24_cpu`: the dense weight [out_features, in_features] with zeros in place."""
    check_packed_sparse24_cpu(values, meta, out_features, in_features)
    m = meta.to(torch.int64)
    nib = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(out_features, -1)  # [out, K_p/4]
    bits = (nib.unsqueeze(-1) >> torch.arange(4, device=meta.device)) & 1  # [out, K_p/4, 4]
    bad = (bits.sum(-1) != 2).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"sparse24 cpu: meta row {r}, group {g} does not mark exactly 2 kept positions; "
                         "the packed tensors are corrupt")
    idx = torch.sort(bits * 4 - torch.arange(4, device=meta.device), dim=-1, descending=True).indices[..., :2]
    idx = torch.sort(idx, dim=-1).values  # the two set positions, ascending
    w = torch.zeros(out_features, idx.shape[1], 4, dtype=values.dtype, device=values.device)
    w.scatter_(2, idx, values.view(out_features, -1, 2))
    return w.view(out_features, -1)[:, :in_features].contiguous()


def sparse24_linear_cpu_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                            out_features: int, in_features: int) -> torch.Tensor:
    """Torch twin: F.linear of x [..., in] with the unpacked (dense-with-zeros) weight → [..., out], x's dtype."""
    w = unpack_sparse24_cpu(values, meta, out_features, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def kernel_supported(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the CPU kernels take this case (CPU tensors, fp32/bf16 activations and weights)."""
    return (x.device.type == "cpu" and values.device.type == "cpu" and x.dtype in KERNEL_DTYPES
            and values.dtype in KERNEL_DTYPES)


def sparse24_linear_cpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int, in_features: int, *, backend: str | None = None,
                        isa: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias with W packed by `pack_sparse24_cpu`.

    x: [..., in_features] float32 | bfloat16 (any float dtype on the torch path); returns [..., out_features] in
    x's dtype, accumulated in fp32. backend: auto | cpu | torch (env SPARSEFAST_BACKEND). isa (cpu backend): auto |
    avx512 | avx2 | scalar (env SPARSEFAST_CPU_ISA). Threads: torch.get_num_threads(), split over output rows.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse24_linear_cpu: x has {x.shape[-1]} features but in_features is {in_features}")
    check_packed_sparse24_cpu(values, meta, out_features, in_features)
    chosen = select_backend("sparse24_linear_cpu", x, backend, has=("cpu", "torch"),
                            cuda_ok=kernel_supported(x, values))
    if chosen == "torch":
        return sparse24_linear_cpu_ref(x, values, meta, bias, out_features, in_features)
    return torch.ops.sparsefast.sparse24_linear_cpu(x, values, meta, bias, out_features, in_features, cpu_isa(isa))
