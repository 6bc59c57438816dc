"""Load the compiled CUDA extension: prebuilt `sparsefast._C` → JIT build with ninja (SPARSEFAST_JIT=1) → None.
Importing this module never fails; `load_extension()` returns None where there is no extension, and
`extension_error()` says why."""

from __future__ import annotations

import functools
import glob
import os

_ERROR: str | None = None


def _jit_build():
    import torch
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        raise RuntimeError(f"JIT build needs the source tree; {csrc} not found")
    archs = os.environ.get("SPARSEFAST_CUDA_ARCHS", "80;90a").split(";")
    sources = [os.path.join(csrc, "bindings.cpp")] + sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    return load(
        name="sparsefast_C_jit",
        sources=sources,
        extra_include_paths=[csrc],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo",
                           *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]],
        verbose=os.environ.get("SPARSEFAST_JIT_VERBOSE") == "1",
    ) if torch.cuda.is_available() else None


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled module, or None (CPU machine, not built)."""
    global _ERROR
    try:
        import torch  # noqa: F401  (loads libc10 and friends before the extension)

        from sparsefast import _C  # type: ignore[attr-defined]

        return _C
    except ImportError as exc:
        _ERROR = f"prebuilt sparsefast._C not importable: {exc}"
    if os.environ.get("SPARSEFAST_JIT") == "1":
        try:
            mod = _jit_build()
            if mod is None:
                _ERROR = "JIT build skipped: no CUDA device"
            return mod
        except Exception as exc:  # a failed JIT build must not break import of the package
            _ERROR = f"JIT build failed: {exc}"
    return None


def extension_error() -> str | None:
    load_extension()
    return _ERROR
