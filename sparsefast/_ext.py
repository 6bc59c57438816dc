"""Load the compiled extensions. Importing this module never fails.

* CUDA `sparsefast._C`: prebuilt → JIT build with ninja (SPARSEFAST_JIT=1) → None; `load_extension()` returns the
  module or None, and `extension_error()` says why.
* CPU `sparsefast._cpu` (csrc/cpu/, ops registered as torch.ops.sparsefast.*_cpu): prebuilt by `pip install -e .`
  → JIT build with ninja on first use (needs a C++ compiler; skipped when SPARSEFAST_NO_COMPILER=1) → unavailable,
  in which case sparse layers run the dense torch path and `load_cpu_extension()` warns once with the reason.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import shutil
import sys
import warnings

_ERROR: str | None = None
_CPU_ERROR: str | None = None
NO_COMPILER_ENV = "SPARSEFAST_NO_COMPILER"
CPU_CFLAGS = ["-O3", "-fopenmp", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]  # as setup.py (why: there)


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


def _cpu_sources() -> tuple[str, list[str]]:
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    return csrc, sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def _jit_build_cpu() -> None:
    from torch.utils.cpp_extension import load

    csrc, sources = _cpu_sources()
    if not sources:
        raise RuntimeError(f"the JIT build needs the source tree; no {csrc}/cpu/*.cpp")
    print("sparsefast: compiling the CPU sparse kernels (once, about 30 s)...", file=sys.stderr)
    load(name="sparsefast_cpu_jit", sources=sources, extra_include_paths=[csrc], extra_cflags=CPU_CFLAGS,
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=os.environ.get("SPARSEFAST_JIT_VERBOSE") == "1")


# every op the CPU extension registers (a prebuilt library missing one was built from older sources), and the
# linear ops, whose schemas must have this version's last argument
CPU_LINEAR_OPS = ("sparse24_linear_cpu", "sparse_unstructured_linear_cpu", "dense_linear_cpu")
CPU_OPS = (*CPU_LINEAR_OPS, "decode_attention_cpu", "cpu_best_isa")


def _register_cpu_fakes() -> None:
    """Shape functions of the CPU ops (linears: y [..., out_features] in x's dtype; decode attention: q's shape and
    dtype), so FakeTensor tracing and torch.compile see through them."""
    import torch

    torch.library.register_fake("sparsefast::sparse24_linear_cpu")(
        lambda x, values, meta, bias, out_features, in_features, isa, scales, int8_activations:
        x.new_empty((*x.shape[:-1], out_features)))
    torch.library.register_fake("sparsefast::sparse_unstructured_linear_cpu")(
        lambda x, values, mask, tile_offsets, bias, out_features, in_features, isa, scales, int8_activations:
        x.new_empty((*x.shape[:-1], out_features)))
    torch.library.register_fake("sparsefast::dense_linear_cpu")(
        lambda x, weight, bias, isa, scales, int8_activations: x.new_empty((*x.shape[:-1], weight.shape[0])))
    torch.library.register_fake("sparsefast::decode_attention_cpu")(
        lambda q, keys, values, slots, positions, scale, isa: q.new_empty(q.shape))


@functools.lru_cache(maxsize=None)
def load_cpu_extension(jit: bool = True) -> bool:
    """True when the CPU sparse ops (torch.ops.sparsefast.sparse24_linear_cpu, ...) are registered: from the prebuilt
    library, else (`jit`) from a JIT build of the sources. On False it has warned once, with the reason, that sparse
    layers fall back to dense F.linear on CPU (with `jit=False` it returns False silently where a build would run)."""
    global _CPU_ERROR
    import torch

    spec = importlib.util.find_spec("sparsefast._cpu")
    stale = False
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as exc:
            _CPU_ERROR = f"prebuilt {spec.origin} does not load: {exc}"
        else:
            missing = [op for op in CPU_OPS if not hasattr(torch.ops.sparsefast, op)]
            missing += [f"{op}(int8_activations)" for op in CPU_LINEAR_OPS if op not in missing
                        and "int8_activations" not in str(getattr(torch.ops.sparsefast, op).default._schema)]
            if not missing:
                _register_cpu_fakes()
                _CPU_ERROR = None
                return True
            # an extension built from older sources: its ops are registered now, so a JIT build of this
            # version's sources could not register them again in this process
            stale = True
            _CPU_ERROR = (f"prebuilt {spec.origin} predates this version of sparsefast (no "
                          f"{', '.join(missing)}); rebuild it")
    else:
        _CPU_ERROR = "sparsefast._cpu was not built (no C++ compiler at install time?)"
    compiler = os.environ.get("CXX", "c++")
    if not jit and not stale:  # registered by a JIT build earlier in this process, or not at all
        return all(hasattr(torch.ops.sparsefast, op) for op in CPU_OPS)
    if stale:
        pass
    elif os.environ.get(NO_COMPILER_ENV) == "1":
        _CPU_ERROR += f"; JIT build skipped ({NO_COMPILER_ENV}=1)"
    elif shutil.which(compiler) is None or shutil.which("ninja") is None:
        _CPU_ERROR += f"; JIT build needs {compiler} and ninja on PATH"
    else:
        try:
            _jit_build_cpu()
            _register_cpu_fakes()
            _CPU_ERROR = None
            return True
        except Exception as exc:  # a failed JIT build must leave the package usable on the torch path
            _CPU_ERROR += f"; JIT build failed: {exc}"
    warnings.warn(f"sparsefast: CPU sparse kernels unavailable ({_CPU_ERROR}); sparse layers run as dense F.linear "
                  "on CPU. Reinstall with a C++ compiler (pip install --no-build-isolation -e .) to get them.",
                  RuntimeWarning, stacklevel=2)
    return False


def cpu_extension_error() -> str | None:
    """Why the CPU kernels are unavailable (None when they loaded)."""
    load_cpu_extension()
    return _CPU_ERROR
