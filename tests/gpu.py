"""`gpu_test`: marks a test gpu + cuda_ext and skips it without CUDA, for files that mix CPU and GPU tests (CPU CI
deselects both markers; on a GPU machine `pytest -m gpu` runs them)."""

from __future__ import annotations

import pytest
import torch

GPU_MARKS = (pytest.mark.gpu, pytest.mark.cuda_ext,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def gpu_test(fn):
    for mark in GPU_MARKS:
        fn = mark(fn)
    return fn
