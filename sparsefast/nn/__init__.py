"""Sparse inference modules: Sparse24Linear (CUDA layout; CPU kernels on CPU), SparseLinear (CPU layouts: 2:4 and
unstructured) and the helpers that swap them into a model."""

from sparsefast.nn.sparse24_linear import (
    DEFAULT_DISPATCH,
    DispatchTable,
    Sparse24Linear,
    load_dispatch_table,
    swap_linear_with_sparse24,
)
from sparsefast.nn.sparse_linear import SparseLinear, choose_sparse_layer, swap_linear_with_sparse

__all__ = ["DEFAULT_DISPATCH", "DispatchTable", "Sparse24Linear", "SparseLinear", "choose_sparse_layer",
           "load_dispatch_table", "swap_linear_with_sparse", "swap_linear_with_sparse24"]
