"""Op tests: without CUDA the triton kernels run under the interpreter. The variable must be set before the first
import of a triton kernel, i.e. before the test modules are collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
