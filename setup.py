"""Build script. The CUDA extension `sparsefast._C` is built only when it can be: torch with CUDA importable in the
build environment (use `pip install --no-build-isolation`) and nvcc on PATH, or SPARSEFAST_BUILD_CUDA=1 to insist.
Otherwise the package installs as pure Python and says why. Triton kernels in `kernels/` install as
`sparsefast.kernels` (a top-level `kernels` would clash with the PyPI package of that name)."""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """Return ([ext_modules], cmdclass) or ([], {}) with a printed reason."""
    force = os.environ.get("SPARSEFAST_BUILD_CUDA") == "1"
    why = None
    try:
        import torch
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


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=find_packages(include=["sparsefast", "sparsefast.*"]) + ["sparsefast.kernels"],
    package_dir={"sparsefast.kernels": "kernels"},
    package_data={"sparsefast.data": ["bundled/*", "bundled/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
