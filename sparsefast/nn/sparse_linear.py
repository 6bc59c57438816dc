"""`SparseLinear`: an nn.Linear whose sparse weight is stored in a CPU kernel layout, 2:4 (sparsefast.ops.sparse24_cpu)
or unstructured (sparsefast.ops.sparse_unstructured), and `swap_linear_with_sparse`, which puts in each layer the
fastest of dense / 2:4 / unstructured as measured on this machine (sparsefast.nn.cpu_dispatch).

Forward picks, by the number of tokens M, the CPU kernel or dense F.linear from the layer's dispatch table. A layer
whose table runs dense for some M keeps its dense weight too (`dense` buffer, the original tensor, not a copy), so
those M cost exactly what nn.Linear costs; a layer whose kernel wins everywhere keeps only the packed weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsefast._ext import load_cpu_extension
from sparsefast.nn.cpu_dispatch import DEFAULT_CPU_DISPATCH, calibrate_cpu_dispatch
from sparsefast.nn.sparse24_linear import DispatchTable
from sparsefast.ops.sparse24 import check_sparse24
from sparsefast.ops.sparse24_cpu import (
    cpu_isa,
    kernel_supported,
    pack_sparse24_cpu,
    sparse24_linear_cpu,
    unpack_sparse24_cpu,
)
from sparsefast.ops.sparse_unstructured import (
    pack_sparse_unstructured,
    sparse_unstructured_linear_cpu,
    unpack_sparse_unstructured,
    weight_sparsity,
)

LAYOUTS = ("2:4", "unstructured")
MIN_SPARSITY = 0.3  # below this neither layout moves fewer bytes enough to be worth timing (0.7 + 1/32 of dense)


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W [out, in] stored packed for the CPU kernels.

    layout "2:4": buffers values [N_p/8, K_p/32, 8, 16], meta [N_p/8, K_p/32, 8] int32 (sparsefast.ops.sparse24_cpu);
    "unstructured": values [nnz + 16], mask [N_p/8, K_p/16, 8] int16, tile_offsets [N_p/8 + 1] int64
    (sparsefast.ops.sparse_unstructured). x: [..., in] → [..., out] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, layout: str, packed: tuple[torch.Tensor, ...],
                 bias: torch.Tensor | None = None, dispatch: DispatchTable | None = None,
                 dense: torch.Tensor | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"SparseLinear: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        names = ("values", "meta") if layout == "2:4" else ("values", "mask", "tile_offsets")
        if len(packed) != len(names):
            raise ValueError(f"SparseLinear: layout {layout} takes {len(names)} packed tensors ({', '.join(names)})")
        self._names = names
        for name, t in zip(names, packed):
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)
        self.dispatch = dispatch if dispatch is not None else DEFAULT_CPU_DISPATCH
        self._routes: dict[tuple, tuple | None] = {}  # (numel, dtype, device type) -> (op, isa) | None (dense)

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str = "unstructured", dispatch: DispatchTable | None = None,
                   keep_dense: bool = False) -> "SparseLinear":
        """Pack `linear.weight` (zeros in place; for "2:4" it must be 2:4 sparse) and copy its bias."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        packed = pack_sparse24_cpu(weight) if layout == "2:4" else pack_sparse_unstructured(weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, layout, packed, bias, dispatch,
                   weight if keep_dense else None)

    def packed(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self._names)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout!r}, "
                f"bias={self.bias is not None}, dispatch={self.dispatch.source!r}")

    def dense_weight(self) -> torch.Tensor:
        """The dense-with-zeros weight [out, in] (the kept one, else unpacked now)."""
        if self.dense is not None:
            return self.dense
        if self.layout == "2:4":
            return unpack_sparse24_cpu(*self.packed(), self.out_features, self.in_features)
        return unpack_sparse_unstructured(*self.packed(), self.out_features, self.in_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU kernel path (torch twin where the kernels cannot run)."""
        fn = sparse24_linear_cpu if self.layout == "2:4" else sparse_unstructured_linear_cpu
        return fn(x, *self.packed(), self.bias, self.out_features, self.in_features)

    def backend_for(self, x: torch.Tensor) -> str:
        """"cpu" or "dense": the path forward() takes for this input."""
        if not kernel_supported(x, self.values) or not load_cpu_extension():
            return "dense"
        backend = self.dispatch.backend_for(x.numel() // max(x.shape[-1], 1))
        return "cpu" if backend == "cpu" else "dense"

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: the buffers' dtype or device may change
        self._routes = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        # The path (and the kernel's instruction set) is decided once per input size, dtype and device: a decoded
        # token calls ~200 of these layers, and at M = 1 a kernel call takes tens of µs, so the per-call Python of
        # backend_for and the functional op's checks (the packed tensors were checked when packed) would cost as
        # much as the bytes the sparse layout saves.
        key = (x.numel(), x.dtype, x.device.type)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self.kernel_call() if self.backend_for(x) == "cpu" else None
        if route is not None:
            return route(x)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def kernel_call(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> y through the CPU kernel as forward() calls it once it has chosen the kernel: the registered op,
        the instruction set decided now, no per-call checks (the packed tensors were checked when packed)."""
        op, isa, packed = self._op.default, cpu_isa(), self.packed()
        return lambda x: op(x, *packed, self.bias, self.out_features, self.in_features, isa)

    @property
    def _op(self):
        return (torch.ops.sparsefast.sparse24_linear_cpu if self.layout == "2:4"
                else torch.ops.sparsefast.sparse_unstructured_linear_cpu)


def _fits_24(weight: torch.Tensor) -> bool:
    try:
        check_sparse24(weight)
    except ValueError:
        return False
    return True


def choose_sparse_layer(linear: nn.Linear, *, calibrate: bool = True) -> tuple[nn.Module, dict]:
    """The fastest of dense (the layer itself) / 2:4 / unstructured for `linear`, by timings on this machine.

    Returns (module, record): module is `linear` unchanged when no sparse layout beats dense at any calibrated M.
    calibrate=False skips timing: 2:4 where the weight fits it, else unstructured, with DEFAULT_CPU_DISPATCH.
    """
    weight = linear.weight.detach()
    sparsity = weight_sparsity(weight)
    layouts = (["2:4"] if _fits_24(weight) else []) + ["unstructured"]
    record: dict = {"sparsity": round(sparsity, 4), "candidates": {}}
    if not calibrate:
        layer = SparseLinear.from_dense(linear, layouts[0])
        record["chosen"] = layouts[0]
        return layer, record
    best: tuple[float, SparseLinear, DispatchTable] | None = None
    dense_ms = None
    for layout in layouts:
        layer = SparseLinear.from_dense(linear, layout)
        packed = layer.packed()

        def kernel_copy(packed=packed, layout=layout, bias=layer.bias) -> Callable[[torch.Tensor], torch.Tensor]:
            # A new layer over clones of the packed weight (the calibration times each copy from DRAM), called as a
            # swapped layer's forward calls it; the torch twin where the kernels cannot run.
            copy = SparseLinear(linear.in_features, linear.out_features, layout, tuple(t.clone() for t in packed),
                                bias)
            return copy.kernel_call() if load_cpu_extension() else copy.kernel

        key = (tuple(weight.shape), str(weight.dtype), layout, round(sparsity, 2))
        table, timings = calibrate_cpu_dispatch(kernel_copy, sum(t.numel() * t.element_size() for t in packed),
                                                weight, key=key)
        record["candidates"][layout] = {"table": [list(r) for r in table.rows], "timings": timings}
        total = sum(min(t["kernel_ms"], t["dense_ms"]) for t in timings.values())
        dense_ms = sum(t["dense_ms"] for t in timings.values())
        if any(b == "cpu" for _, b in table.rows) and (best is None or total < best[0]):
            best = (total, layer, table)
    if best is None:
        record["chosen"] = "dense"
        return linear, record
    _, layer, table = best  # the candidate already packed: the chosen layout is not packed again
    keep_dense = any(b == "dense" for _, b in table.rows)
    record.update(chosen=layer.layout, dense_ms_sum=dense_ms, keeps_dense=keep_dense)
    return SparseLinear(linear.in_features, linear.out_features, layer.layout, layer.packed(), layer.bias, table,
                        weight if keep_dense else None), record


def swap_linear_with_sparse(model: nn.Module, filter_fn: Callable[[str, nn.Linear], bool] | None = None, *,
                            calibrate: bool = True) -> dict[str, dict]:
    """Replace nn.Linear modules of a CPU `model` (in place) by SparseLinear where a sparse layout is faster.

    filter_fn(name, linear) selects candidate layers; default: every nn.Linear with at least MIN_SPARSITY zeros (so
    a dense, e.g. embedding-tied, head is left alone). Each candidate gets the fastest of dense / 2:4 / unstructured
    from timings measured now on this machine (see sparsefast.nn.cpu_dispatch), with calibrate=True. Returns
    {name: record} for every candidate: its sparsity, the chosen layout ("dense": left as nn.Linear) and timings.
    """
    chosen: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if mod.weight.device.type != "cpu":
            raise ValueError(f"swap_linear_with_sparse: layer {name!r} is on {mod.weight.device}; the CPU kernels "
                             "need a CPU model (use swap_linear_with_sparse24 on CUDA)")
        wanted = filter_fn(name, mod) if filter_fn is not None else weight_sparsity(mod.weight) >= MIN_SPARSITY
        if wanted:
            chosen.append((name, mod))
    records: dict[str, dict] = {}
    for name, mod in chosen:
        new, records[name] = choose_sparse_layer(mod, calibrate=calibrate)
        if new is not mod:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    return records
