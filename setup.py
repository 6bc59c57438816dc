"""Build script. Two optional extensions, each built only when it can be (use `pip install --no-build-isolation` so
the build sees the installed torch):

* `sparsefast._C` (CUDA kernels): torch with CUDA and nvcc on PATH, or SPARSEFAST_BUILD_CUDA=1 to insist (=0 to skip);
* `sparsefast._cpu` (CPU sparse kernels, csrc/cpu/): any torch and a C++ compiler; SPARSEFAST_NO_COMPILER=1 skips
  it. It is an optional extension: a failed compile warns and the package still installs (the kernels then JIT on
  first use, or sparse layers run dense, and sparsefast says so once).

Otherwise the package installs as pure Python and says why. Triton kernels in `kernels/` install as
`sparsefast.kernels` (a top-level `kernels` would clash with the PyPI package of that name)."""

import glob
import os
import shutil
import sys

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_CFLAGS = ["-O3", "-fopenmp", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


def _quiet_torch_import():
    """Import torch without its "Failed to initialize NumPy" warning (numpy is not needed to build; the warning
    appears when the build environment's numpy does not match torch's)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*NumPy.*")
        import torch
    return torch


def _cpu_extension():
    """Return ([CppExtension], cmdclass) or ([], {}) with a printed reason."""
    why = None
    compiler = os.environ.get("CXX", "c++")
    if os.environ.get("SPARSEFAST_NO_COMPILER") == "1":
        why = "SPARSEFAST_NO_COMPILER=1"
    elif shutil.which(compiler) is None:
        why = f"no C++ compiler ({compiler}) on PATH"
    else:
        try:
            _quiet_torch_import()
            from torch.utils.cpp_extension import BuildExtension, CppExtension
        except ImportError:
            why = "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if why is not None:
        print(f"sparsefast: skipping the CPU kernels ({why}); sparse layers will run dense on CPU.", file=sys.stderr)
        return [], {}
    ext = CppExtension(
        name="sparsefast._cpu",
        sources=sorted(glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -fopenmp: at::parallel_for is an inline OpenMP loop that runs serially unless compiled with it; the process
        # then shares torch's libgomp (same soname), so torch.set_num_threads governs the kernels too
        # torch adds its -std (C++20 for torch 2.13). -Wno-*uninitialized: GCC 12 reports its own _mm512_undefined
        # intrinsics (avx512fintrin.h) as uninitialised under -O3, pages of noise at every install
        extra_compile_args=CPU_CFLAGS,
        extra_link_args=["-fopenmp"],
        optional=True,
    )
    return [ext], {"build_ext": BuildExtension}


def _cuda_extension():
    """Return ([ext_modules], cmdclass) or ([], {}) with a printed reason."""
    force = os.environ.get("SPARSEFAST_BUILD_CUDA") == "1"
    if os.environ.get("SPARSEFAST_BUILD_CUDA") == "0":
        print("sparsefast: skipping the CUDA extension (SPARSEFAST_BUILD_CUDA=0).", file=sys.stderr)
        return [], {}
    why = None
    try:
        torch = _quiet_torch_import()
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        why = "torch is not importable in the build environment (use pip install --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            why = "nvcc / CUDA_HOME not found"
    if why is not None:
        if force:
            sys.exit(f"SPARSEFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"sparsefast: skipping the CUDA extension ({why}); installing pure Python.", file=sys.stderr)
        return [], {}
    archs = os.environ.get("SPARSEFAST_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/**/*.cu", recursive=True))
    ext = CUDAExtension(
        name="sparsefast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


cuda_modules, cuda_cmdclass = _cuda_extension()
cpu_modules, cpu_cmdclass = _cpu_extension()
ext_modules, cmdclass = cuda_modules + cpu_modules, {**cpu_cmdclass, **cuda_cmdclass}

setup(
    # namespace packages too: the data directories are then packages that own their files (setuptools warns about
    # importable-looking data directories that are "absent from the packages configuration")
    packages=find_namespace_packages(include=["sparsefast", "sparsefast.*"], exclude=["*.__pycache__"]),
    package_data={"sparsefast.data.bundled": ["*.md", "wikitext-2-raw/*"], "sparsefast.data.bundled.c4": ["*"],
                  "sparsefast.nn.dispatch_tables": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
