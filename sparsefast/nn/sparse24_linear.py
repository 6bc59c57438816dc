"""`Sparse24Linear`: an nn.Linear whose 2:4-sparse weight is stored packed in the CUDA kernels' layout
(sparsefast.ops.sparse24: values + mma.sp metadata, the form it is saved and moved in) and whose forward runs the path
that sparsefast.nn.dispatch picks for the input's device and number of tokens M:

* CUDA inputs: the layer's CUDA table (chosen at the first CUDA forward: see sparsefast.nn.dispatch) → sparsefast's
  kernels, torch's semi-structured sparse matmul, or dense F.linear on the unpacked weight;
* CPU inputs: the CPU table (`cpu_dispatch`, default DEFAULT_CPU_DISPATCH: the kernels for M <= 64) → sparsefast's CPU
  2:4 kernel on a CPU-layout copy of the weight derived once, or dense F.linear.

sparsefast.nn.SparseLinear is the module for weights that only ever run on the CPU: it stores the CPU layouts alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefast.nn.dispatch import (
    DEFAULT_CPU_DISPATCH,
    DispatchTable,
    cpu_backend_for,
    default_dispatch,
    sparse24_backend_for,
)
from sparsefast.ops.sparse24 import pack_sparse24, sparse24_matmul_cuda, unpack_sparse24
from sparsefast.ops.sparse24_cpu import cpu_isa, pack_sparse24_cpu


class Sparse24Linear(nn.Module):
    """y = x Wᵀ + b with W [out, in] 2:4 sparse, stored as packed `values` and `meta` buffers.

    values [N_p/16, K_p/32, 256] and meta [N_p/16, K_p/64, 32] int32 as `pack_sparse24` writes them (N_p, K_p: out
    and in rounded up to 16 and 64). x: [..., in_features] → [..., out_features] in x's dtype (fp16/bf16 for the CUDA
    kernels, fp32/bf16 for the CPU ones). `dispatch` overrides the CUDA table, `cpu_dispatch` the CPU one.
    """

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None = None, dispatch: DispatchTable | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", bias)
        self.dispatch = dispatch  # None: default_dispatch(device of the first CUDA input), then kept
        self._cache: dict[tuple, torch.Tensor] = {}  # derived weights (dense, semi-structured), rebuilt on demand
        self._backends: dict[tuple, str] = {}  # backend_for per (M, dtype, device): see forward()
        self.cpu_dispatch: DispatchTable | None = None  # CPU inputs; None: DEFAULT_CPU_DISPATCH

    @classmethod
    def from_dense(cls, linear: nn.Linear, dispatch: DispatchTable | None = None) -> "Sparse24Linear":
        """Pack `linear.weight` (must already be 2:4 sparse: zeros in place) and copy its bias."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Sparse24Linear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        values, meta = pack_sparse24(weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, values, meta, bias, dispatch)

    def extra_repr(self) -> str:
        source = self.dispatch.source if self.dispatch is not None else "per device (chosen at the first CUDA call)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dispatch={source!r}")

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): derived weights are stale afterwards
        self._cache, self._backends = {}, {}
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        """The unpacked weight [out, in] (cached)."""
        key = ("dense", self.values.device, self.values.dtype)
        if key not in self._cache:
            self._cache[key] = unpack_sparse24(self.values, self.meta, self.out_features, self.in_features)
        return self._cache[key]

    def _semi_structured_weight(self) -> torch.Tensor | None:
        key = ("semi", self.values.device, self.values.dtype)
        if key not in self._cache:
            try:
                from torch.sparse import to_sparse_semi_structured

                self._cache[key] = to_sparse_semi_structured(self.dense_weight())
            except (RuntimeError, ValueError, NotImplementedError):  # shape/dtype/arch not supported by torch
                self._cache[key] = None
        return self._cache[key]

    def backend_for(self, x: torch.Tensor) -> str:
        """The path forward() takes for this input (decided by sparsefast.nn.dispatch)."""
        if not x.is_cuda:
            return cpu_backend_for(self.cpu_dispatch or DEFAULT_CPU_DISPATCH, x, self.values)
        if self.dispatch is None:
            self.dispatch = default_dispatch(x.device)
        return sparse24_backend_for(self.dispatch, x, self.values, self.in_features, self._semi_structured_weight)

    def _cpu_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, meta) in the CPU kernels' layout, derived once per dtype; the weight is unpacked transiently,
        not cached: only the CPU layout stays."""
        key = ("cpu24", self.values.dtype)
        if key not in self._cache:
            self._cache[key] = pack_sparse24_cpu(
                unpack_sparse24(self.values, self.meta, self.out_features, self.in_features))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Sparse24Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        # The path is decided once per input size, dtype and device (as SparseLinear decides its route): the decision
        # loads the extension and reads tables, which torch.compile cannot trace; the compiled decode step runs one
        # eager step per batch bucket before its capture, so tracing finds the decision made.
        key = (x.numel(), x.dtype, x.device)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = self.backend_for(x)
        if backend == "cuda":
            y = sparse24_matmul_cuda(x, self.values, self.meta, self.out_features, self.in_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if backend == "cpu":  # the registered op: the packed tensors were checked when packed, the case by dispatch
            return torch.ops.sparsefast.sparse24_linear_cpu(x, *self._cpu_layout(), self.bias, self.out_features,
                                                            self.in_features, cpu_isa(), None, False)
        if backend == "semi_structured":
            x2 = x.reshape(-1, self.in_features)
            y = F.linear(x2, self._semi_structured_weight(), self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        w = self.dense_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
