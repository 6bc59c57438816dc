"""`SparseLinear`: an nn.Linear whose sparse weight is stored in a CPU kernel layout, 2:4 (sparsefast.ops.sparse24_cpu)
or unstructured (sparsefast.ops.sparse_unstructured). `sparsefast.nn.sparsify_` puts one in each layer where a layout
beats dense on this machine, with the table measured there (sparsefast.nn.dispatch).

Forward picks, by the number of tokens M, the CPU kernel or the dense route (sparsefast.ops.dense_cpu.linear_cpu)
from the layer's dispatch table. A layer whose table runs dense for some M keeps its dense weight too (`dense`
buffer, the original tensor, not a copy), so those M cost exactly what a dense layer costs; a layer whose kernel
wins everywhere keeps only the packed weight.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sparsefast.nn.dispatch import DEFAULT_CPU_DISPATCH, DispatchTable, cpu_backend_for
from sparsefast.ops.dense_cpu import dense_layer_reads, dense_layer_route
from sparsefast.ops.int8_rows import SCALE_BUFFER, dequantize_int8_rows, int8_activation_linear, quantize_int8_rows
from sparsefast.ops.sparse24_cpu import (
    cpu_isa,
    pack_sparse24_cpu,
    sparse24_linear_cpu,
    unpack_sparse24_cpu,
)
from sparsefast.ops.sparse_unstructured import (
    pack_sparse_unstructured,
    sparse_unstructured_linear_cpu,
    unpack_sparse_unstructured,
)

LAYOUTS = ("2:4", "unstructured")
PACKED_NAMES = {"2:4": ("values", "meta"), "unstructured": ("values", "mask", "tile_offsets")}  # buffers per layout


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W [out, in] stored packed for the CPU kernels.

    layout "2:4": buffers values [N_p/8, K_p/32, 8, 16], meta [N_p/8, K_p/32, 8] int32 (sparsefast.ops.sparse24_cpu);
    "unstructured": values [nnz + 16], mask [N_p/8, K_p/16, 8] int16, tile_offsets [N_p/8 + 1] int64
    (sparsefast.ops.sparse_unstructured). values may be int8 with `scales` float32 [out] (W = scales[row] · values,
    sparsefast.ops.int8_rows); with `int8_activations` such a layer also quantizes x per token and 32-column block
    (dynamic W8A8, int8_rows.int8_activation_linear). x: [..., in] → [..., out] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, layout: str, packed: tuple[torch.Tensor, ...],
                 bias: torch.Tensor | None = None, dispatch: DispatchTable | None = None,
                 dense: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 int8_activations: bool = False) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"SparseLinear: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if int8_activations and scales is None:
            raise ValueError("SparseLinear: int8 activations need int8 weights with scales (prune --quantize int8)")
        self.int8_activations = int8_activations
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        names = PACKED_NAMES[layout]
        if len(packed) != len(names):
            raise ValueError(f"SparseLinear: layout {layout} takes {len(names)} packed tensors ({', '.join(names)})")
        self._names = names
        for name, t in zip(names, packed):
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)
        self.register_buffer("scales", scales)  # int8 values: float32 [out] per-row scales (sparsefast.ops.int8_rows)
        # an int8 layer's kept dense weight as int8 too: its dense rows for few tokens run the dense int8 kernel, the
        # baseline its table was measured against (sparsefast.nn.dispatch); derived, so not saved
        dense_q = None if dense is None or scales is None else quantize_int8_rows(dense, scales)[0]
        self.register_buffer("dense_q", dense_q, persistent=False)
        self.dispatch = dispatch if dispatch is not None else DEFAULT_CPU_DISPATCH
        self._routes: dict[tuple, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}  # see forward()

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str = "unstructured", dispatch: DispatchTable | None = None,
                   keep_dense: bool = False, int8_activations: bool = False) -> "SparseLinear":
        """Pack `linear.weight` (zeros in place; for "2:4" it must be 2:4 sparse) and copy its bias. A linear with a
        `weight_scale` buffer (int8-quantized by `prune --quantize int8`: weight = scale · q) is packed as int8 q
        with those scales (and may take `int8_activations`)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        scales = getattr(linear, SCALE_BUFFER, None)
        stored = weight if scales is None else quantize_int8_rows(weight, scales)[0]
        packed = pack_sparse24_cpu(stored) if layout == "2:4" else pack_sparse_unstructured(stored)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, layout, packed, bias, dispatch,
                   weight if keep_dense else None, None if scales is None else scales.detach().float().clone(),
                   int8_activations)

    def packed(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self._names)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout!r}, "
                f"bias={self.bias is not None}, int8_activations={self.int8_activations}, "
                f"dispatch={self.dispatch.source!r}")

    def dense_weight(self) -> torch.Tensor:
        """The dense-with-zeros weight [out, in] (the kept one, else unpacked now)."""
        if self.dense is not None:
            return self.dense
        w = self._unpacked()
        return w if self.scales is None else dequantize_int8_rows(w, self.scales)

    def _unpacked(self) -> torch.Tensor:
        """The stored weight [out, in] unpacked now: the float weight, or an int8 layer's q."""
        if self.layout == "2:4":
            return unpack_sparse24_cpu(*self.packed(), self.out_features, self.in_features)
        return unpack_sparse_unstructured(*self.packed(), self.out_features, self.in_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU kernel path (torch twin where the kernels cannot run)."""
        fn = sparse24_linear_cpu if self.layout == "2:4" else sparse_unstructured_linear_cpu
        return fn(x, *self.packed(), self.bias, self.out_features, self.in_features, scales=self.scales,
                  int8_activations=self.int8_activations)

    def backend_for(self, x: torch.Tensor) -> str:
        """"cpu" or "dense": the path forward() takes for this input (decided by sparsefast.nn.dispatch)."""
        return cpu_backend_for(self.dispatch, x, self.values, self.int8_activations)

    def tensors_read(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The weight tensors a forward of inputs like `x` reads (decode bandwidth accounting)."""
        if self.backend_for(x) == "dense" and self.dense is not None:
            read = dense_layer_reads(x, self.dense, self.dense_q, self.scales, self.int8_activations)
        else:
            read = list(self.packed()) + ([self.scales] if self.scales is not None else [])
        return read + ([self.bias] if self.bias is not None else [])

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
        if key not in self._routes:
            self._routes[key] = (("cpu", self.kernel_call()) if self.backend_for(x) == "cpu"
                                 else ("dense", self.dense_call(x)))
        return self._routes[key][1](x)

    def dense_call(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> y through the dense route (sparsefast.ops.dense_cpu.dense_layer_route: the int8 kernel on the kept
        dense weight's q for an int8 layer and few tokens) on the dense-with-zeros weight, as forward() calls it for
        inputs like `x` once it has chosen dense."""
        if self.int8_activations and self.dense_q is None:  # no kept dense weight: the twin on the unpacked q
            return lambda x: int8_activation_linear(x, self._unpacked(), self.scales, self.bias)
        route = dense_layer_route(x, self.dense_weight(), self.dense_q, self.scales, self.int8_activations)
        return lambda x: route(x, self.dense_weight(), self.bias)

    def kernel_call(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> y through the CPU kernel as forward() calls it once it has chosen the kernel: the registered op,
        the instruction set decided now, no per-call checks (the packed tensors were checked when packed)."""
        op, isa, packed, a8 = self._op.default, cpu_isa(), self.packed(), self.int8_activations
        return lambda x: op(x, *packed, self.bias, self.out_features, self.in_features, isa, self.scales, a8)

    @property
    def _op(self):
        return (torch.ops.sparsefast.sparse24_linear_cpu if self.layout == "2:4"
                else torch.ops.sparsefast.sparse_unstructured_linear_cpu)
