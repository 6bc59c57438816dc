"""Triton kernels for Wanda masks (Sun et al. 2023): the |W|·‖X‖ ranking and the per-row / per-group selection in
one pass over W, the score never written to memory. Torch twin: sparsefast.ops.wanda_mask.wanda_mask_ref.

Key. key_ij = fl32(fl32(W_ij²)·s_j), the twin's two fp32 multiplies (no add, so no FMA contraction can change it).
Its fp32 bit pattern is mapped to a uint32 whose unsigned order is the float order used by torch.sort: -0.0 is
folded onto +0.0 (they tie), negative values (only with a negative s) flip all bits, NaN (inf·0) maps to the maximum.

Unstructured (one program per row; the row stays in registers). With k = int(in·sparsity) we need the k-th smallest
key (0-based) T: the largest uint32 t with #{key < t} ≤ k. It is built bit by bit from the top (a 32-step
bisection, one row-wide count per step, no sort). Then every key < T is pruned, plus the first k - #{key < T} keys
equal to T in column order (an exclusive prefix count via tl.cumsum): exactly the twin's (key, column) order.

N:M (groups of M consecutive columns; M | in so groups never straddle rows). Each element's rank in its group is the
number of group elements before it in (key, column) order, an M×M comparison in registers; rank < M - N is pruned.

Both kernels count non-finite weights into one int32 flag the host checks once, and in the in-place variant skip
writing any row (unstructured) or tile (N:M) that holds one, so a poisoned weight is never partly pruned there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest row kept in registers (LLaMA-70B down_proj has 28672 columns → a 32768 block). Wider rows go to torch.
MAX_ROW_BLOCK = 65536
# Elements per N:M program before the M×M comparison: BG · MP² ≤ NM_TILE.
NM_TILE = 8192


@triton.jit
def _sortable_key(w, s):
    """uint32 whose unsigned order is the float order of the fp32 key (w·w)·s (torch.sort's order)."""
    wf = w.to(tl.float32)
    key = (wf * wf) * s
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 ties with +0.0, as in a float sort
    bits = key.to(tl.uint32, bitcast=True)
    # x ^ 0xFFFFFFFF, not ~x: triton 3.8's interpreter builds ~'s all-ones as int -1, which numpy 2 refuses for uint32
    ordered = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(key != key, 0xFFFFFFFF, ordered)  # NaN sorts last


@triton.jit(do_not_specialize=["k"])  # k varies per sparsity: one compile per (dtype, BLOCK)
def _wanda_row_kernel(w_ptr, s_ptr, out_ptr, flag_ptr, cols, stride_r, stride_c, k,
                      BLOCK: tl.constexpr, IN_PLACE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inb = offs < cols
    w_ptrs = w_ptr + row * stride_r + offs * stride_c
    w = tl.load(w_ptrs, mask=inb, other=0.0)
    s = tl.load(s_ptr + offs, mask=inb, other=0.0)
    bad = tl.sum(((tl.abs(w.to(tl.float32)) < float("inf")) == 0).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(flag_ptr, bad)
    # padding sorts last and sits after every real column, so it changes neither T nor the ranks of real keys
    u = tl.where(inb, _sortable_key(w, s), 0xFFFFFFFF)

    thr = tl.full([], 0, tl.uint32)
    less = tl.full([], 0, tl.int32)
    for bit in tl.static_range(31, -1, -1):
        cand = thr | (1 << bit)
        cnt = tl.sum((u < cand).to(tl.int32), axis=0)
        take = cnt <= k
        thr = tl.where(take, cand, thr)
        less = tl.where(take, cnt, less)

    eq = (u == thr).to(tl.int32)
    rank_eq = tl.cumsum(eq, axis=0) - eq
    prune = ((u < thr) | ((eq != 0) & (rank_eq < k - less))) & inb
    if IN_PLACE:
        clean = (offs * 0 + bad) == 0  # a full-shape mask: the interpreter rejects a scalar-broadcast one
        tl.store(w_ptrs, tl.zeros([BLOCK], dtype=w.dtype), mask=prune & clean)
    else:
        tl.store(out_ptr + row * cols + offs, prune.to(tl.uint8), mask=inb)


@triton.jit
def _wanda_nm_kernel(w_ptr, s_ptr, out_ptr, flag_ptr, n_groups, groups_per_row, stride_r, stride_c,
                     N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BG: tl.constexpr,
                     IN_PLACE: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BG + tl.arange(0, BG)
    j = tl.arange(0, MP)
    row = g // groups_per_row
    col = (g % groups_per_row) * M
    cols2 = col[:, None] + j[None, :]
    inb = (g[:, None] < n_groups) & (j[None, :] < M)
    w_ptrs = w_ptr + row[:, None] * stride_r + cols2 * stride_c
    w = tl.load(w_ptrs, mask=inb, other=0.0)
    s = tl.load(s_ptr + cols2, mask=inb, other=0.0)
    bad = tl.sum(tl.sum(((tl.abs(w.to(tl.float32)) < float("inf")) == 0).to(tl.int32), axis=1), axis=0)
    if bad > 0:
        tl.atomic_add(flag_ptr, bad)
    u = tl.where(inb, _sortable_key(w, s), 0xFFFFFFFF)

    # before[g, i, j]: element j of group g precedes element i in (key, column) order
    ui = u[:, :, None]
    uj = u[:, None, :]
    ii = j[None, :, None]
    jj = j[None, None, :]
    before = ((uj < ui) | ((uj == ui) & (jj < ii))) & (jj < M)
    rank = tl.sum(before.to(tl.int32), axis=2)
    prune = (rank < M - N) & inb
    if IN_PLACE:
        clean = (cols2 * 0 + bad) == 0
        tl.store(w_ptrs, tl.zeros([BG, MP], dtype=w.dtype), mask=prune & clean)
    else:
        tl.store(out_ptr + g[:, None] * M + j[None, :], prune.to(tl.uint8), mask=inb)


def row_launch_config(cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for the unstructured kernel: the whole row in registers, ~32 keys per thread."""
    block = max(16, triton.next_power_of_2(cols))
    return block, max(1, min(32, block // 1024))


def wanda_mask_triton(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, k: int | None = None,
                      n: int | None = None, m: int | None = None, in_place: bool = False,
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Launch the unstructured (k given) or N:M (n, m given) kernel.

    weight [out, in] fp32/fp16/bf16, any strides; act_sq_norm [in] fp32 contiguous, same device. Arguments are
    assumed validated by sparsefast.ops.wanda_mask. Returns (mask, flag): mask [out, in] bool (True = pruned), or
    None when in_place (then the pruned weights are zeroed in `weight`); flag is a 1-element int32 device tensor
    holding the number of non-finite weights (nothing is synchronised here).
    """
    rows, cols = weight.shape
    s = act_sq_norm.contiguous()
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device)
    mask = None if in_place else torch.empty(rows, cols, dtype=torch.bool, device=weight.device)
    out = weight if mask is None else mask.view(torch.uint8)  # unused pointer when in place
    if rows == 0 or cols == 0:
        return mask, flag
    if k is not None:
        block, warps = row_launch_config(cols)
        if block > MAX_ROW_BLOCK:
            raise ValueError(f"wanda_mask: triton kernel keeps a row in registers, up to {MAX_ROW_BLOCK} columns; "
                             f"got {cols}; use backend='torch'")
        _wanda_row_kernel[(rows,)](weight, s, out, flag, cols, weight.stride(0), weight.stride(1), k,
                                   BLOCK=block, IN_PLACE=in_place, num_warps=warps)
    else:
        if n is None or m is None:
            raise ValueError("wanda_mask_triton: give k (unstructured) or n and m (N:M)")
        mp = triton.next_power_of_2(m)
        bg = max(1, NM_TILE // (mp * mp))
        n_groups = rows * (cols // m)
        grid = (triton.cdiv(n_groups, bg),)
        _wanda_nm_kernel[grid](weight, s, out, flag, n_groups, cols // m, weight.stride(0), weight.stride(1),
                               N=n, M=m, MP=mp, BG=bg, IN_PLACE=in_place, num_warps=4)
    return mask, flag
