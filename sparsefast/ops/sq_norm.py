"""Streaming per-input-channel squared activation norm, Σ_tokens x_j², for Wanda's ‖X_j‖₂² statistic.

The accumulator is float32 (float64 allowed on CPU); the input is [..., in] in any float dtype and is read once.
"""

from __future__ import annotations

import torch


def check_sq_norm_args(acc: torch.Tensor, x: torch.Tensor) -> None:
    if acc.dim() != 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"sq_norm_accumulate: acc must be [in] matching x[..., in]; got acc {tuple(acc.shape)}, "
                         f"x {tuple(x.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sq_norm_accumulate: acc must be float32 or float64, got {acc.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"sq_norm_accumulate: x must be a float tensor, got {x.dtype}")
    if acc.device != x.device:
        raise ValueError(f"sq_norm_accumulate: acc on {acc.device} but x on {x.device}")


def sq_norm_accumulate_ref(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += Σ over all leading dims of x² (computed in acc's dtype). Raises on NaN/inf in x. Returns acc."""
    check_sq_norm_args(acc, x)
    x2 = x.reshape(-1, x.shape[-1]).to(acc.dtype)
    part = (x2 * x2).sum(0)
    if not torch.isfinite(part).all():
        raise ValueError("sq_norm_accumulate: calibration activations hold NaN or inf (or overflow when squared); "
                         "check the model's dtype (try --dtype float32) and the calibration data")
    acc += part
    return acc


def sq_norm_accumulate(acc: torch.Tensor, x: torch.Tensor, *, backend: str | None = "auto") -> torch.Tensor:
    """acc += Σ x² per input channel, dispatched per sparsefast.ops._dispatch."""
    from sparsefast.ops._dispatch import select_backend

    select_backend("sq_norm_accumulate", x, backend, has=("torch",))
    return sq_norm_accumulate_ref(acc, x)
