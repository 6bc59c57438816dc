"""Backend selection shared by every op.

`auto` picks, in order: `cuda` (compiled extension loaded, tensors on CUDA, op supports the case) → `triton` (tensors
on CUDA, triton importable) → `cpu` (the CPU extension's kernels, for ops that have them, on CPU tensors) → `torch`.
Other CPU tensors get the torch twin under `auto`, also when TRITON_INTERPRET=1 is set (the interpreter is for
testing the kernels, which force backend="triton"; it is far too slow to prune with).
A forced backend that cannot run raises a clear error. The environment variable SPARSEFAST_BACKEND forces one for
tests and benchmarks.
"""

from __future__ import annotations

import functools
import os

import torch

from sparsefast.device import BACKEND_CHOICES


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(op: str, tensor: torch.Tensor, backend: str | None, *, has: tuple[str, ...],
                   cuda_ok: bool = True) -> str:
    """Return the backend that runs `op` on `tensor`.

    has: the backends this op implements (subset of cuda/triton/cpu/torch). cuda_ok: False when the op's compiled
    kernel (CUDA, or CPU for ops with a `cpu` backend) does not support this particular case (dtype, alignment), so
    `auto` skips it and forcing it errors.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("SPARSEFAST_BACKEND", "auto") or "auto"
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    on_cuda = tensor.is_cuda
    if backend == "auto":
        if "cuda" in has and on_cuda and cuda_ok:
            from sparsefast._ext import load_extension

            if load_extension() is not None:
                return "cuda"
        if "triton" in has and triton_available() and on_cuda:
            return "triton"
        if "cpu" in has and tensor.device.type == "cpu" and cuda_ok:
            from sparsefast._ext import load_cpu_extension

            if load_cpu_extension():
                return "cpu"
        return "torch"
    if backend not in has:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; available: {', '.join(has)}")
    if backend == "cuda":
        from sparsefast._ext import load_extension

        if not on_cuda:
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got device {tensor.device}")
        if not cuda_ok:
            raise ValueError(f"{op}: the CUDA kernel does not support this input (dtype {tensor.dtype}, "
                             f"shape {tuple(tensor.shape)}); use backend='auto'")
        if load_extension() is None:
            raise RuntimeError(f"{op}: backend 'cuda' requested but the sparsefast._C extension is not built; "
                               "build it with `pip install --no-build-isolation -e .` on a CUDA machine "
                               "or set SPARSEFAST_JIT=1")
    if backend == "cpu":
        from sparsefast._ext import cpu_extension_error, load_cpu_extension

        if tensor.device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got device {tensor.device}")
        if not cuda_ok:
            raise ValueError(f"{op}: the CPU kernel does not support this input (dtype {tensor.dtype}, "
                             f"shape {tuple(tensor.shape)}); use backend='auto'")
        if not load_cpu_extension():
            raise RuntimeError(f"{op}: backend 'cpu' requested but the CPU kernels are unavailable: "
                               f"{cpu_extension_error()}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed (pip install triton)")
        if not on_cuda and not triton_interpret():
            raise ValueError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend
