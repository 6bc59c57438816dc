"""2:4 sparse weights: packing into the layout of the CUDA kernels, its exact inverse, and `sparse24_matmul`.

y = x Wᵀ (nn.Linear convention) with W [N=out, K=in] 2:4 sparse along K: every group of 4 consecutive columns of
a row holds at most 2 nonzeros (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). W is the sparse A
operand of `mma.sp.sync.aligned.m16n8k32` (its rows are the MMA's m, 16 per tile) and the activations are the dense
B operand (tokens are n), so each MMA computes yᵀ[16 rows, 8 tokens] += W_tile[16, 32] · xᵀ[32, 8 tokens].

Packed format (the "fragment order" the kernels load directly; N_p = round_up(N, 16), K_p = round_up(K, 64)):

* Padding: W is zero-padded to [N_p, K_p]. Padded groups get kept positions (0, 1) and zero values, so they add
  exactly 0; the kernels never write rows >= N and zero-fill activations at columns >= K.
* Kept positions: in each 4-group, the positions of its nonzeros, completed (when it has fewer than 2) with the
  lowest zero positions, in ascending order (i0 < i1; `mma.sp::ordered_metadata` requires it). The compressed row
  has 2 values per group: compressed column 2·grp + s holds W[row, 4·grp + i_s].
* values: [N_p/16, K_p/32, 256], dtype of W. Tile (rb, kt) = rows 16rb..16rb+15, dense columns 32kt..32kt+31
  (16 compressed columns). Inside a tile, lane L = 4g + t (g = L // 4, t = L % 4) owns elements 8L..8L+7, which are
  the mma.sp A fragment a0..a7 of that lane: e = 4·ch + 2·rh + cs holds compressed (row g + 8·rh,
  column 8·ch + 2t + cs).  One 16-byte load per lane, 512 contiguous bytes per warp.
* meta: [N_p/16, K_p/64, 32], int32 (bit pattern of a uint32). Block (rb, kc) covers dense columns 64kc..64kc+63 =
  k tiles 2kc + h, h ∈ {0, 1}. Word L = 4g + 2h + p is the sparsity-selector-0 metadata register of lane 4g + p for
  k tile 2kc + h: bits [15:0] describe row g and bits [31:16] row g + 8 of rb; within each half, nibble q
  (bits 4q..4q+3) describes group 4p + q of the k tile (dense columns 32(2kc+h) + 4(4p+q) ..+3): bits [1:0] = i0,
  bits [3:2] = i1.  Lanes read word L for h = 0 and word L ^ 2 for h = 1 (a shuffle in registers or a permuted
  shared-memory read), so the warp's metadata is one 128-byte load per 64 columns.
* Bytes: values 0.5 and metadata 0.0625 of the dense fp16/bf16 bytes (0.5625 in all: decode ceiling 1.78x).

The torch twin (`sparse24_matmul_ref`) unpacks and runs a dense matmul; it is the CPU path and the test reference.
"""

from __future__ import annotations

import torch

from sparsefast.ops._dispatch import select_backend

ROW_BLOCK = 16
K_CHUNK = 64
DECODE_MAX_M = 32
# The kernel codes of the registered op. Code 2 (the first GEMM) stays in csrc/ as the A/B baseline of
# bench/micro/bench_sparse24_matmul.py, which calls the raw op with it; it is not a choice of the public function.
_KERNELS = {"auto": 0, "decode": 1, "gemm": 3}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(N_p, K_p): out_features rounded up to 16 rows, in_features to 64 columns."""
    return -(-out_features // ROW_BLOCK) * ROW_BLOCK, -(-in_features // K_CHUNK) * K_CHUNK


def check_sparse24(weight: torch.Tensor) -> None:
    """Raise ValueError unless `weight` [out, in] has at most 2 nonzeros in every group of 4 columns of a row."""
    if weight.dim() != 2:
        raise ValueError(f"sparse24: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"sparse24: weight dtype {weight.dtype} unsupported; use float16, bfloat16 or float32")
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"sparse24: weight has an empty dimension {tuple(weight.shape)}")
    pad = -cols % 4
    nz = torch.nn.functional.pad(weight != 0, (0, pad)).view(rows, -1, 4).sum(-1)
    bad = (nz > 2).nonzero()
    if bad.numel():
        r, grp = (int(v) for v in bad[0])
        raise ValueError(f"sparse24: weight is not 2:4 sparse: row {r}, group {grp} (columns {4 * grp}..{4 * grp + 3})"
                         f" has {int(nz[r, grp])} nonzeros ({bad.shape[0]} offending groups in all); prune it with "
                         "an N:M=2:4 mask first (e.g. wanda_mask(..., n=2, m=4))")


def is_sparse24(weight: torch.Tensor) -> bool:
    """Whether `check_sparse24` accepts `weight` (2-D float [out, in], at most 2 nonzeros per 4-group of a row)."""
    try:
        check_sparse24(weight)
    except ValueError:
        return False
    return True


def to_sparse24_by_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-|w| entries of every 4-group along `in` (ties: the lower column is zeroed first).
    weight [out, in] with in % 4 == 0; returns a 2:4-sparse copy. A utility for tests and benchmarks, not a pruner
    (sparsefast.prune has the calibrated ones)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"to_sparse24_by_magnitude: need [out, in] with in % 4 == 0, got {tuple(weight.shape)}")
    w4 = weight.reshape(weight.shape[0], -1, 4)
    drop = torch.sort(w4.abs(), dim=-1, stable=True).indices[..., :2]  # stable: ties drop the lower column
    return w4.scatter(2, drop, torch.zeros_like(w4)).reshape_as(weight)


def _kept_positions(w4: torch.Tensor) -> torch.Tensor:
    """[..., 4] group values → [..., 2] int64 kept positions: nonzeros first, then lowest zeros; ascending."""
    pos = torch.arange(4, device=w4.device)
    key = (w4 == 0).to(torch.int64) * 4 + pos  # nonzeros sort before zeros, ties by position
    idx = torch.sort(key, dim=-1).indices[..., :2]
    return torch.sort(idx, dim=-1).values


def pack_sparse24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4-sparse weight [out, in] (fp16/bf16; fp32 for the CPU path only) into
    (values [N_p/16, K_p/32, 256], meta [N_p/16, K_p/64, 32] int32) in the fragment order documented in this module.
    Exact: `unpack_sparse24` returns the same weight."""
    check_sparse24(weight)
    rows, cols = weight.shape
    n_p, k_p = padded_shape(rows, cols)
    w = torch.zeros(n_p, k_p, dtype=weight.dtype, device=weight.device)
    w[:rows, :cols] = weight
    w4 = w.view(n_p, k_p // 4, 4)
    idx = _kept_positions(w4)  # [N_p, K_p/4, 2]
    comp = torch.gather(w4, 2, idx).reshape(n_p, k_p // 2)
    # compressed tile [16 rows, 16 cols] = [rh, g, ch, t, cs] → lane-major [g, t, ch, rh, cs]
    tiles = comp.view(n_p // 16, 2, 8, k_p // 32, 2, 4, 2)  # rb, rh, g, kt, ch, t, cs
    values = tiles.permute(0, 3, 2, 5, 4, 1, 6).reshape(n_p // 16, k_p // 32, 256).contiguous()
    nib = idx[..., 0] | (idx[..., 1] << 2)  # [N_p, K_p/4] int64
    nib = nib.view(n_p // 16, 2, 8, k_p // 64, 2, 2, 4)  # rb, rh, g, kc, h, p, q
    shifts = (torch.arange(2, device=w.device).view(2, 1) * 16 + torch.arange(4, device=w.device) * 4)  # [rh, q]
    words = (nib << shifts.view(1, 2, 1, 1, 1, 1, 4)).sum(dim=(1, 6))  # rb, g, kc, h, p
    words = words.permute(0, 2, 1, 3, 4).reshape(n_p // 16, k_p // 64, 32)
    meta = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return values, meta


def _check_packed(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> None:
    n_p, k_p = padded_shape(out_features, in_features)
    if tuple(values.shape) != (n_p // 16, k_p // 32, 256):
        raise ValueError(f"sparse24: values shape {tuple(values.shape)} does not match a {out_features}x{in_features} "
                         f"weight; expected {(n_p // 16, k_p // 32, 256)} (pack with pack_sparse24)")
    if tuple(meta.shape) != (n_p // 16, k_p // 64, 32) or meta.dtype != torch.int32:
        raise ValueError(f"sparse24: meta must be int32 {(n_p // 16, k_p // 64, 32)}, got {meta.dtype} "
                         f"{tuple(meta.shape)}")


def unpack_sparse24(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_sparse24`: the dense weight [out_features, in_features] with zeros in place."""
    _check_packed(values, meta, out_features, in_features)
    n_p, k_p = padded_shape(out_features, in_features)
    comp = values.view(n_p // 16, k_p // 32, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6).reshape(n_p, k_p // 4, 2)
    words = meta.to(torch.int64) & 0xFFFFFFFF  # rb, kc, L = (g, h, p)
    words = words.view(n_p // 16, k_p // 64, 8, 2, 2)
    shifts = (torch.arange(2, device=meta.device).view(2, 1) * 16 + torch.arange(4, device=meta.device) * 4)
    nib = (words.unsqueeze(-1).unsqueeze(-1) >> shifts) & 0xF  # rb, kc, g, h, p, rh, q
    nib = nib.permute(0, 5, 2, 1, 3, 4, 6).reshape(n_p, k_p // 4)
    idx = torch.stack((nib & 3, nib >> 2), dim=-1)
    if bool((idx[..., 0] >= idx[..., 1]).any()):
        raise ValueError("sparse24: metadata holds a group whose kept positions are not strictly ascending; "
                         "the packed tensors are corrupt")
    w = torch.zeros(n_p, k_p // 4, 4, dtype=values.dtype, device=values.device)
    w.scatter_(2, idx, comp)
    return w.view(n_p, k_p)[:out_features, :in_features].contiguous()


def sparse24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_features: int,
                        in_features: int) -> torch.Tensor:
    """Torch twin: x [..., in] @ unpack(W)ᵀ → [..., out] in x's dtype."""
    w = unpack_sparse24(values, meta, out_features, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype))


@torch.library.custom_op("sparsefast::sparse24_matmul", mutates_args=())
def _sparse24_matmul_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_features: int,
                        in_features: int, kernel: int) -> torch.Tensor:
    """CUDA kernels: x [M, in] contiguous fp16/bf16 with 16-byte aligned rows, in % 8 == 0 → y [M, out].
    kernel 0 auto, 1 decode (M <= DECODE_MAX_M), 2 gemm v1 (A/B baseline only), 3 gemm v2."""
    from sparsefast._ext import extension_error, load_extension

    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"sparsefast::sparse24_matmul needs the CUDA extension: {extension_error()}")
    return ext.sparse24_matmul(x, values, meta, out_features, in_features, kernel)


@_sparse24_matmul_op.register_fake
def _(x, values, meta, out_features, in_features, kernel):
    torch._check(x.dim() == 2)
    torch._check(x.shape[1] == in_features)
    return x.new_empty((x.shape[0], out_features))


def cuda_supported(x: torch.Tensor, values: torch.Tensor, in_features: int) -> bool:
    """Whether the CUDA kernels take this case (dtype, alignment); `auto` dispatch falls back otherwise."""
    return (x.dtype in (torch.float16, torch.bfloat16) and values.dtype == x.dtype and in_features % 8 == 0
            and x.is_cuda and values.is_cuda)


def _kernel_code(kernel: str) -> int:
    if kernel not in _KERNELS:
        raise ValueError(f"sparse24_matmul: kernel must be one of {', '.join(_KERNELS)}, got {kernel!r}")
    return _KERNELS[kernel]


def sparse24_matmul_cuda(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_features: int,
                         in_features: int, kernel: str = "auto") -> torch.Tensor:
    """The CUDA kernels' entry point, without backend selection or checks of the packed tensors: for callers that
    have decided on this path themselves (sparsefast.nn's dispatch) and for `sparse24_matmul` once it has.

    x: [..., in_features] CUDA fp16/bf16 (any strides: made contiguous, 16-byte aligned) with values/meta packed by
    `pack_sparse24` on the same device and dtype; returns [..., out_features] in x's dtype. kernel: auto | decode |
    gemm. Without the extension the registered op raises RuntimeError saying why.
    """
    x2 = x.reshape(-1, in_features).contiguous()
    if x2.data_ptr() % 16:  # an offset view: the kernels need 16-byte aligned rows
        x2 = x2.clone()
    code = _kernel_code(kernel)
    if kernel == "decode" and x2.shape[0] > DECODE_MAX_M:
        raise ValueError(f"sparse24_matmul: the decode kernel takes at most {DECODE_MAX_M} tokens, got {x2.shape[0]}")
    y = _sparse24_matmul_op(x2, values, meta, out_features, in_features, code)
    return y.view(*x.shape[:-1], out_features)


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int,
                    *, backend: str | None = None, kernel: str = "auto") -> torch.Tensor:
    """y = x Wᵀ with W packed by `pack_sparse24`.

    x: [..., in_features] fp16/bf16 (fp32 on the torch path); returns [..., out_features] in x's dtype.
    backend: auto | cuda | torch (env SPARSEFAST_BACKEND). kernel (cuda only): auto (the decode kernel for M <= 8
    tokens, else the tiled GEMM v2) | decode (M <= 32) | gemm (v2: 4 stages, a 64-token tile for M <= 128, split-K).
    """
    _kernel_code(kernel)  # a bad name is refused on every backend
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse24_matmul: x has {x.shape[-1]} features but in_features is {in_features}")
    _check_packed(values, meta, out_features, in_features)
    if x.device != values.device or x.device != meta.device:
        raise ValueError(f"sparse24_matmul: x on {x.device}, values on {values.device}, meta on {meta.device}")
    chosen = select_backend("sparse24_matmul", x, backend, has=("cuda", "torch"),
                            cuda_ok=cuda_supported(x, values, in_features))
    if chosen == "torch":
        return sparse24_matmul_ref(x, values, meta, out_features, in_features)
    return sparse24_matmul_cuda(x, values, meta, out_features, in_features, kernel)
