"""Wanda masks (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

score_ij = |W_ij| · ‖X_j‖₂. We rank by key_ij = fl32(fl32(W_ij²) · s_j) with s_j = Σ_tokens x_j² (fp32): the same
order as the score in exact arithmetic (both factors non-negative, sqrt is monotone), no sqrt, and a key that the
Triton kernel reproduces bit for bit (same two fp32 multiplies, no FMA possible).

Deterministic tie rule (shared by every backend): weights are ordered by (key, column index) ascending, and the
lowest ones in that order are pruned. Equal keys → the lower column index is pruned first.

- unstructured: per output row, exactly k = int(in_features * sparsity) weights are pruned (the Python float
  product truncated, as in the Wanda reference code).
- N:M: in every group of M consecutive input columns of a row, the M - N lowest are pruned (N kept).

Returns a bool mask [out, in], True where the weight is PRUNED (Wanda's W_mask convention).
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_wanda_args(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float | None,
                     n: int | None, m: int | None, *, check_weight: bool = True) -> None:
    """Validate shapes, dtypes, pattern and finiteness (of the weight too unless check_weight=False: the triton
    kernels count non-finite weights themselves); raise ValueError naming the problem."""
    if weight.dim() != 2:
        raise ValueError(f"wanda_mask: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"wanda_mask: weight dtype {weight.dtype} unsupported; use float32, float16 or bfloat16")
    if act_sq_norm.dim() != 1 or act_sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(f"wanda_mask: act_sq_norm must be [in]={weight.shape[1]}, got {tuple(act_sq_norm.shape)}")
    if act_sq_norm.dtype != torch.float32:
        raise ValueError(f"wanda_mask: act_sq_norm must be float32, got {act_sq_norm.dtype}")
    if act_sq_norm.device != weight.device:
        raise ValueError(f"wanda_mask: weight on {weight.device} but act_sq_norm on {act_sq_norm.device}")
    if (n is None) != (m is None):
        raise ValueError("wanda_mask: give both n and m for an N:M pattern, or neither")
    if n is not None:
        if sparsity not in (None, 0.0):
            raise ValueError("wanda_mask: give either sparsity (unstructured) or n and m (N:M), not both")
        if not (0 < n < m):
            raise ValueError(f"wanda_mask: N:M needs 0 < N < M, got {n}:{m}")
        if weight.shape[1] % m:
            raise ValueError(f"wanda_mask: in_features {weight.shape[1]} is not divisible by M={m}")
    elif sparsity is None or not (0.0 <= sparsity < 1.0):
        raise ValueError(f"wanda_mask: sparsity must be in [0, 1), got {sparsity}")
    if not torch.isfinite(act_sq_norm).all():
        raise ValueError("wanda_mask: act_sq_norm holds NaN or inf (calibration activations overflowed)")
    if check_weight and not all_finite(weight):
        raise ValueError(_NONFINITE_WEIGHT)


_NONFINITE_WEIGHT = "wanda_mask: weight holds NaN or inf; check the checkpoint (or the dtype it was loaded in)"


def all_finite(t: torch.Tensor) -> bool:
    """True when t holds no NaN/inf; one reduction pass (aminmax propagates NaN), no [out, in] temporary."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """k = int(in_features * sparsity): the exact number of weights pruned per row (unstructured)."""
    return int(in_features * sparsity)


def wanda_key(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """fp32 ranking key W² · s, [out, in]."""
    w = weight.float()
    return (w * w) * act_sq_norm[None, :]


def wanda_mask_ref(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, sparsity: float | None = None,
                   n: int | None = None, m: int | None = None, row_chunk: int = 1024) -> torch.Tensor:
    """Torch twin: stable sort of the key per row (unstructured) or per M-group (N:M). Rows are processed in
    chunks of `row_chunk` so the fp32 key never exceeds row_chunk × in elements."""
    check_wanda_args(weight, act_sq_norm, sparsity, n, m)
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    for r0 in range(0, rows, row_chunk):
        key = wanda_key(weight[r0:r0 + row_chunk], act_sq_norm)
        if n is None:
            k = pruned_per_row(cols, sparsity)
            if k:
                idx = torch.sort(key, dim=1, stable=True).indices[:, :k]
                mask[r0:r0 + row_chunk].scatter_(1, idx, True)
        else:
            g = key.view(key.shape[0], cols // m, m)
            idx = torch.sort(g, dim=2, stable=True).indices[:, :, : m - n]
            mask[r0:r0 + row_chunk].view(key.shape[0], cols // m, m).scatter_(2, idx, True)
    return mask


def _triton_unsupported(weight: torch.Tensor, n: int | None, m: int | None) -> str | None:
    """Why the triton kernels cannot take this input (None when they can)."""
    from sparsefast.kernels.wanda_mask import MAX_ROW_BLOCK

    if n is None and weight.shape[1] > MAX_ROW_BLOCK:
        return f"rows of {weight.shape[1]} columns; the row kernel holds at most {MAX_ROW_BLOCK} in registers"
    if m is not None and m > 32:
        return f"N:M group size M={m}; the kernel supports M <= 32"
    return None


def _pick_backend(weight: torch.Tensor, n: int | None, m: int | None, backend: str | None) -> str:
    from sparsefast.ops._dispatch import triton_available
    from sparsefast.ops.sq_norm import select_triton_or_torch

    unsupported = _triton_unsupported(weight, n, m) if triton_available() else None
    return select_triton_or_torch("wanda_mask", weight, backend, unsupported)


def _launch(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float | None, n: int | None,
            m: int | None, in_place: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    from sparsefast.kernels.wanda_mask import wanda_mask_triton

    k = None if n is not None else pruned_per_row(weight.shape[1], sparsity)
    return wanda_mask_triton(weight, act_sq_norm, k=k, n=n, m=m, in_place=in_place)


def wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, sparsity: float | None = None,
               n: int | None = None, m: int | None = None, backend: str | None = "auto") -> torch.Tensor:
    """Wanda prune mask (True = pruned), dispatched per sparsefast.ops._dispatch. Same mask on every backend.

    weight [out, in] float32/float16/bfloat16 (any strides); act_sq_norm [in] float32 (Σ_tokens x²). Give
    `sparsity` (unstructured: int(in·sparsity) pruned per row) or `n` and `m` (N:M). Returns bool [out, in].
    Raises ValueError on bad arguments or NaN/inf in either input. The triton backend needs no full-size
    temporary and never writes the score; it synchronises once to read its non-finite flag.
    """
    if _pick_backend(weight, n, m, backend) == "torch":
        return wanda_mask_ref(weight, act_sq_norm, sparsity=sparsity, n=n, m=m)
    check_wanda_args(weight, act_sq_norm, sparsity, n, m, check_weight=False)
    mask, flag = _launch(weight, act_sq_norm, sparsity, n, m, in_place=False)
    if int(flag.item()):
        raise ValueError(_NONFINITE_WEIGHT)
    return mask


@torch.no_grad()
def wanda_prune_(weight: torch.Tensor, act_sq_norm: torch.Tensor, *, sparsity: float | None = None,
                 n: int | None = None, m: int | None = None, backend: str | None = "auto",
                 check_finite: bool = True) -> torch.Tensor:
    """Zero, in place, exactly the weights wanda_mask(...) marks as pruned; returns `weight`.

    The triton backend writes the zeros from the selection kernel (no mask tensor). check_finite=True first scans
    the weight once (aminmax) so NaN/inf raise before anything is written; with check_finite=False the kernel's own
    count still raises afterwards, and rows (unstructured) or tiles (N:M) holding NaN/inf are left unwritten.
    """
    choice = _pick_backend(weight, n, m, backend)
    check_wanda_args(weight, act_sq_norm, sparsity, n, m, check_weight=check_finite)
    if choice == "torch":
        weight.masked_fill_(wanda_mask_ref(weight, act_sq_norm, sparsity=sparsity, n=n, m=m), 0)
        return weight
    _, flag = _launch(weight, act_sq_norm, sparsity, n, m, in_place=True)
    if int(flag.item()):
        raise ValueError(_NONFINITE_WEIGHT + " (rows/groups holding them were left unchanged)")
    return weight
