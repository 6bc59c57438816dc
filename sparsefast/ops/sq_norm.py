"""Streaming per-input-channel squared activation norm, Σ_tokens x_j², for Wanda's ‖X_j‖₂² statistic
(Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

The accumulator is float32 (float64 allowed); the input is [..., in] in any float dtype and is read once.
Backends: `torch` (the twin below, computed in the accumulator's dtype) and `triton` (kernels/sq_norm.py: fp32
partial sums per token split, summed deterministically; CUDA tensors, or CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch


def check_sq_norm_args(acc: torch.Tensor, x: torch.Tensor) -> None:
    if acc.dim() != 1 or x.dim() < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"sq_norm_accumulate: acc must be [in] matching x[..., in]; got acc {tuple(acc.shape)}, "
                         f"x {tuple(x.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sq_norm_accumulate: acc must be float32 or float64, got {acc.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"sq_norm_accumulate: x must be a float tensor, got {x.dtype}")
    if acc.device != x.device:
        raise ValueError(f"sq_norm_accumulate: acc on {acc.device} but x on {x.device}")


def _check_finite_part(part: torch.Tensor) -> None:
    if not torch.isfinite(part).all():
        raise ValueError("sq_norm_accumulate: calibration activations hold NaN or inf (or overflow when squared); "
                         "check the model's dtype (try --dtype float32) and the calibration data")


def sq_norm_accumulate_ref(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += Σ over all leading dims of x² (computed in acc's dtype). Raises on NaN/inf in x. Returns acc."""
    check_sq_norm_args(acc, x)
    x2 = x.reshape(-1, x.shape[-1]).to(acc.dtype)
    part = (x2 * x2).sum(0)
    _check_finite_part(part)
    acc += part
    return acc


def requested_backend(backend: str | None) -> str:
    """The backend the caller asked for: the argument, or SPARSEFAST_BACKEND when the argument is auto/None."""
    if backend is None or backend == "auto":
        return os.environ.get("SPARSEFAST_BACKEND", "auto") or "auto"
    return backend


def select_triton_or_torch(op: str, tensor: torch.Tensor, backend: str | None, unsupported: str | None) -> str:
    """select_backend for ops with a triton kernel and a torch twin. `unsupported` says why the triton kernel
    cannot take this input (None when it can): `auto` then falls back to torch, a forced 'triton' raises."""
    from sparsefast.ops._dispatch import select_backend

    chosen = select_backend(op, tensor, backend, has=("triton", "torch"))
    if chosen == "triton" and unsupported is not None:
        if requested_backend(backend) == "triton":
            raise ValueError(f"{op}: backend 'triton' cannot run this input ({unsupported}); "
                             "use backend='auto' or 'torch'")
        return "torch"
    return chosen


def sq_norm_accumulate(acc: torch.Tensor, x: torch.Tensor, *, backend: str | None = "auto") -> torch.Tensor:
    """acc [in] (fp32/fp64) += Σ x² over all leading dims of x [..., in]; dispatched per sparsefast.ops._dispatch.

    Both backends raise ValueError, leaving acc unchanged, when the sum is not finite (NaN/inf in x or overflow).
    The triton backend accumulates in fp32 (then adds into acc's dtype); the torch twin in acc's dtype.
    """
    check_sq_norm_args(acc, x)
    unsupported = None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        unsupported = f"x dtype {x.dtype}; the kernel reads float32, float16 and bfloat16"
    if select_triton_or_torch("sq_norm_accumulate", x, backend, unsupported) == "torch":
        return sq_norm_accumulate_ref(acc, x)
    from sparsefast.kernels.sq_norm import sq_norm_partials_triton

    partials = sq_norm_partials_triton(x.reshape(-1, x.shape[-1]))
    part = partials[0].to(acc.dtype) if partials.shape[0] == 1 else partials.sum(0, dtype=acc.dtype)
    _check_finite_part(part)
    acc += part
    return acc
