"""`DenseCpuLinear`: an nn.Linear whose forward takes sparsefast's dense CPU kernel for few tokens
(sparsefast.ops.dense_cpu.linear_cpu), and `use_dense_cpu_kernels_`, which swaps it in for a model's CPU linears.

The module holds the very Parameters of the layer it replaces (no copy: a head tied to the embedding stays tied, the
state dict keeps its keys and values), so the swap changes nothing but the speed of small M. A layer quantized by
`prune --quantize int8` (a `weight_scale` buffer: weight = scale · q per row, sparsefast.ops.int8_rows) also keeps its
int8 q (`qweight`, derived from the weight, so not saved) and reads that, a quarter of the fp32 bytes, for few tokens:
the dense int8 baseline that sparse int8 layers are measured against. Above DENSE_KERNEL_MAX_TOKENS it runs F.linear
on the float weight (oneDNN's GEMMs win there), which is why the float weight stays: an int8 layer costs 1 byte per
weight more memory than its float layer. q is made once, from the weight as it is at the swap: a weight changed in
place afterwards (load_state_dict, a LoRA merge) needs a new swap (`use_dense_cpu_kernels_` on the plain model).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefast._ext import load_cpu_extension
from sparsefast.ops.dense_cpu import DenseCall, dense_layer_reads, dense_layer_route
from sparsefast.ops.int8_rows import SCALE_BUFFER, quantize_int8_rows
from sparsefast.ops.sparse24_cpu import KERNEL_DTYPES


class DenseCpuLinear(nn.Linear):
    """nn.Linear whose forward takes the dense CPU kernel for M <= DENSE_KERNEL_MAX_TOKENS on fp32/bf16 CPU inputs
    (on its int8 q where it has a `weight_scale`), F.linear otherwise (sparsefast.ops.dense_cpu.dense_route); an int8
    layer with `int8_activations` quantizes x to int8 as well (dense_layer_route)."""

    int8_activations: bool = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, int8_activations: bool = False) -> "DenseCpuLinear":
        """A DenseCpuLinear over `linear`'s own weight and bias Parameters (shared, not copied), and its
        `weight_scale` buffer with the int8 q it implies where it has one (`int8_activations`: int8 layers only)."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"DenseCpuLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        scales = getattr(linear, SCALE_BUFFER, None)
        layer.register_buffer(SCALE_BUFFER, scales)
        q = None if scales is None else quantize_int8_rows(linear.weight.detach(), scales)[0]
        layer.register_buffer("qweight", q, persistent=False)
        layer.int8_activations = int8_activations and q is not None
        layer._routes = {}
        return layer

    _routes: dict[tuple, DenseCall]

    def tensors_read(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The weight tensors a forward of inputs like `x` reads (decode bandwidth accounting)."""
        read = dense_layer_reads(x, self.weight, self.qweight, getattr(self, SCALE_BUFFER), self.int8_activations)
        return read + ([self.bias] if self.bias is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.numel(), x.dtype, x.device.type)  # the route is decided once per input size (dense_route)
        if key not in self._routes:
            self._routes[key] = dense_layer_route(x, self.weight, self.qweight, getattr(self, SCALE_BUFFER),
                                                  self.int8_activations)
        return self._routes[key](x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: the weight's dtype or device may change
        self._routes = {}
        return super()._apply(fn, recurse)


def use_dense_cpu_kernels_(model: nn.Module, int8_activations: bool = False) -> list[str]:
    """Replace, in place, every plain nn.Linear of `model` whose weight is a float32/bfloat16 CPU tensor by a
    DenseCpuLinear over the same Parameters (`int8_activations`: the int8-quantized ones with x quantized per token);
    returns the names of the layers replaced. Without the CPU kernels nothing is replaced (the layers would only run
    F.linear anyway) unless int8_activations asks for the torch twin of their numerics."""
    if not load_cpu_extension() and not int8_activations:
        return []
    targets = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False)
               if type(mod) is nn.Linear and mod.weight.device.type == "cpu" and mod.weight.dtype in KERNEL_DTYPES]
    replacements: dict[int, DenseCpuLinear] = {}  # a module registered under two names gets one replacement
    for name, mod in targets:
        new = replacements.setdefault(id(mod), DenseCpuLinear.from_linear(mod, int8_activations))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in targets]
