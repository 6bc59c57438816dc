"""Sparse inference modules and the one entry point that swaps them into a model.

`sparsify_(model, SparsifyConfig(...), filter_fn)` replaces nn.Linear layers by `Sparse24Linear` (CUDA 2:4 layout;
CPU kernels on CPU) or `SparseLinear` (CPU layouts: 2:4 and unstructured); sparsefast.nn.dispatch decides which kernel
each of them runs (`DispatchTable`: measured per GPU family and shipped, or measured on this CPU at swap time). On the
CPU, mode "auto" then gives the layers left dense `DenseCpuLinear` (sparsefast's dense kernel for few tokens, over the
same Parameters; `use_dense_cpu_kernels_`).
"""

from sparsefast.nn.dense_linear import DenseCpuLinear, use_dense_cpu_kernels_
from sparsefast.nn.dispatch import DispatchTable, load_dispatch_table
from sparsefast.nn.sparse24_linear import Sparse24Linear
from sparsefast.nn.sparse_linear import SparseLinear
from sparsefast.nn.sparsify import SparsifyConfig, sparsify_, swap_linear_with_sparse, swapped_layer_names

__all__ = ["DenseCpuLinear", "DispatchTable", "Sparse24Linear", "SparseLinear", "SparsifyConfig", "load_dispatch_table",
           "sparsify_", "swap_linear_with_sparse", "swapped_layer_names", "use_dense_cpu_kernels_"]
