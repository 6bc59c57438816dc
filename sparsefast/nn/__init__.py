"""Sparse inference modules: Sparse24Linear and the helpers that swap them into a model."""

from sparsefast.nn.sparse24_linear import (
    DEFAULT_DISPATCH,
    DispatchTable,
    Sparse24Linear,
    load_dispatch_table,
    swap_linear_with_sparse24,
)

__all__ = ["DEFAULT_DISPATCH", "DispatchTable", "Sparse24Linear", "load_dispatch_table", "swap_linear_with_sparse24"]
