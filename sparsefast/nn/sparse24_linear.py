"""`Sparse24Linear`: an nn.Linear whose 2:4-sparse weight is stored packed (sparsefast.ops.sparse24) and whose
forward picks the fastest path for the number of tokens M from a dispatch table:

* ``cuda``: sparsefast's kernels (decode kernel for M <= 32, mma.sp GEMM above);
* ``semi_structured``: torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS) on the unpacked weight;
* ``cpu``: on CPU tensors, sparsefast's CPU kernels (sparsefast.ops.sparse24_cpu) on a CPU-layout copy of the
  weight derived once (the CUDA-layout buffers stay the saved form; sparsefast.nn.SparseLinear stores only the CPU
  layout), for M <= 64 (DEFAULT_CPU_DISPATCH; `cpu_dispatch` overrides it);
* ``dense``: F.linear on the unpacked weight (CPU inputs the kernels do not take, and the safe fallback).

The table is data: (max_tokens, backend) rows, first match wins. Which table a layer uses, first match wins:
the `dispatch=` argument; the file named by SPARSEFAST_SPARSE24_TABLE (`bench/micro/bench_sparse24_matmul.py` writes
`*-sparse24_dispatch.json`); the measured table shipped for the input's device family (sparsefast/nn/dispatch_tables/
<family>.json, chosen by CUDA device name: h100, h200); else DEFAULT_DISPATCH, the custom kernels for every M (the only
path that reads the packed weight without materialising a dense or cuSPARSELt copy, so it never costs extra memory).
The choice is made at the first CUDA forward, so a layer built on the CPU and moved to the GPU gets its GPU's table.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsefast.ops.sparse24 import (
    check_sparse24,
    cuda_supported,
    pack_sparse24,
    sparse24_matmul,
    unpack_sparse24,
)

BACKENDS = ("cuda", "semi_structured", "dense", "cpu")
TABLE_ENV = "SPARSEFAST_SPARSE24_TABLE"
SHIPPED_TABLES = Path(__file__).resolve().parent / "dispatch_tables"
DEVICE_FAMILIES = (("H100", "h100"), ("H200", "h200"))  # substring of torch.cuda.get_device_name -> table file


@dataclass(frozen=True)
class DispatchTable:
    """rows: ((max_tokens, backend), ...) in increasing max_tokens; the first row with M <= max_tokens wins."""

    rows: tuple[tuple[int, str], ...]
    source: str = "default"

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("DispatchTable: needs at least one (max_tokens, backend) row")
        last = 0
        for max_m, backend in self.rows:
            if backend not in BACKENDS:
                raise ValueError(f"DispatchTable: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
            if max_m <= last:
                raise ValueError(f"DispatchTable: max_tokens must increase, got {[r[0] for r in self.rows]}")
            last = max_m

    def backend_for(self, tokens: int) -> str:
        for max_m, backend in self.rows:
            if tokens <= max_m:
                return backend
        return self.rows[-1][1]


DEFAULT_DISPATCH = DispatchTable(((2**62, "cuda"),), source="default (unmeasured): sparsefast kernels for every M")


def load_dispatch_table(path: str | os.PathLike) -> DispatchTable:
    """Read {"rows": [[max_tokens, backend], ...], ...} as written by bench_sparse24_matmul.py."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sparse24 dispatch table {path} not found; run bench/micro/bench_sparse24_matmul.py")
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON object with a 'rows' list of [max_tokens, backend]")
    return DispatchTable(tuple((int(m), str(b)) for m, b in rows), source=str(path))


def device_family(device_name: str) -> str | None:
    """The shipped-table family of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100"), None if none matches."""
    for key, family in DEVICE_FAMILIES:
        if key in device_name:
            return family
    return None


@functools.lru_cache(maxsize=None)
def _shipped_table(family: str) -> DispatchTable | None:
    path = SHIPPED_TABLES / f"{family}.json"
    return load_dispatch_table(path) if path.is_file() else None


def default_dispatch(device: torch.device | None = None) -> DispatchTable:
    """The table for a layer without an explicit one: $SPARSEFAST_SPARSE24_TABLE, else the table shipped for
    `device`'s family (a CUDA device), else DEFAULT_DISPATCH."""
    path = os.environ.get(TABLE_ENV)
    if path:
        return load_dispatch_table(path)
    if device is not None and device.type == "cuda":
        family = device_family(torch.cuda.get_device_name(device))
        table = _shipped_table(family) if family else None
        if table is not None:
            return table
    return DEFAULT_DISPATCH


class Sparse24Linear(nn.Module):
    """y = x Wᵀ + b with W [out, in] 2:4 sparse, stored as packed `values` and `meta` buffers.

    x: [..., in_features] → [..., out_features], dtype of the packed weight. `dispatch` overrides the table.
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
        self.cpu_dispatch: DispatchTable | None = None  # CPU inputs; None: sparsefast.nn.cpu_dispatch's default

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
        self._cache = {}
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
        """The path forward() takes for this input."""
        if not x.is_cuda:
            from sparsefast._ext import load_cpu_extension
            from sparsefast.nn.cpu_dispatch import DEFAULT_CPU_DISPATCH
            from sparsefast.ops.sparse24_cpu import kernel_supported

            table = self.cpu_dispatch or DEFAULT_CPU_DISPATCH
            if (kernel_supported(x, self.values) and load_cpu_extension()
                    and table.backend_for(x.numel() // max(x.shape[-1], 1)) == "cpu"):
                return "cpu"
            return "dense"
        if self.dispatch is None:
            self.dispatch = default_dispatch(x.device)
        backend = self.dispatch.backend_for(x.numel() // max(x.shape[-1], 1))
        if backend == "cuda" and not cuda_supported(x, self.values, self.in_features):
            return "dense"
        if backend == "semi_structured" and self._semi_structured_weight() is None:
            return "cuda" if cuda_supported(x, self.values, self.in_features) else "dense"
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Sparse24Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        backend = self.backend_for(x)
        if backend == "cuda":
            y = sparse24_matmul(x, self.values, self.meta, self.out_features, self.in_features, backend="cuda")
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if backend == "cpu":
            from sparsefast.ops.sparse24_cpu import pack_sparse24_cpu, sparse24_linear_cpu

            key = ("cpu24", self.values.dtype)
            if key not in self._cache:  # unpacked transiently, not cached: only the CPU layout stays
                self._cache[key] = pack_sparse24_cpu(
                    unpack_sparse24(self.values, self.meta, self.out_features, self.in_features))
            return sparse24_linear_cpu(x, *self._cache[key], self.bias, self.out_features, self.in_features)
        if backend == "semi_structured":
            x2 = x.reshape(-1, self.in_features)
            y = F.linear(x2, self._semi_structured_weight(), self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        w = self.dense_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _is_sparse24(linear: nn.Linear) -> bool:
    try:
        check_sparse24(linear.weight.detach())
    except ValueError:
        return False
    return True


def swap_linear_with_sparse24(model: nn.Module, filter_fn: Callable[[str, nn.Linear], bool] | None = None,
                              dispatch: DispatchTable | None = None) -> list[str]:
    """Replace nn.Linear modules of `model` (in place) by Sparse24Linear; returns the swapped module names.

    filter_fn(name, linear) selects the layers; every selected layer must be 2:4 sparse (ValueError naming the
    first that is not, raised before anything is swapped). Default: every nn.Linear whose weight is 2:4 sparse.
    """
    chosen: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if filter_fn is None:
            if _is_sparse24(mod):
                chosen.append((name, mod))
        elif filter_fn(name, mod):
            try:
                check_sparse24(mod.weight.detach())
            except ValueError as exc:
                raise ValueError(f"swap_linear_with_sparse24: layer {name!r}: {exc}") from None
            chosen.append((name, mod))
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Sparse24Linear.from_dense(mod, dispatch))
    return [name for name, _ in chosen]
