"""`DenseCpuLinear`: an nn.Linear whose forward takes sparsefast's dense CPU kernel for few tokens
(sparsefast.ops.dense_cpu.linear_cpu), and `use_dense_cpu_kernels_`, which swaps it in for a model's CPU linears.

The module holds the very Parameters of the layer it replaces (no copy: a head tied to the embedding stays tied, the
state dict keeps its keys and values), so the swap costs no memory and changes nothing but the speed of small M.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefast._ext import load_cpu_extension
from sparsefast.ops.dense_cpu import DenseCall, dense_route
from sparsefast.ops.sparse24_cpu import KERNEL_DTYPES


class DenseCpuLinear(nn.Linear):
    """nn.Linear whose forward takes the dense CPU kernel for M <= DENSE_KERNEL_MAX_TOKENS on fp32/bf16 CPU inputs,
    F.linear otherwise (sparsefast.ops.dense_cpu.dense_route)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseCpuLinear":
        """A DenseCpuLinear over `linear`'s own weight and bias Parameters (shared, not copied)."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"DenseCpuLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._routes = {}
        return layer

    _routes: dict[tuple, DenseCall]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.numel(), x.dtype, x.device.type)  # the route is decided once per input size (dense_route)
        if key not in self._routes:
            self._routes[key] = dense_route(x, self.weight)
        return self._routes[key](x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: the weight's dtype or device may change
        self._routes = {}
        return super()._apply(fn, recurse)


def use_dense_cpu_kernels_(model: nn.Module) -> list[str]:
    """Replace, in place, every plain nn.Linear of `model` whose weight is a float32/bfloat16 CPU tensor by a
    DenseCpuLinear over the same Parameters; returns the names of the layers replaced. Nothing is replaced when the
    CPU kernels are not available (the layers would only run F.linear anyway)."""
    if not load_cpu_extension():
        return []
    targets = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False)
               if type(mod) is nn.Linear and mod.weight.device.type == "cpu" and mod.weight.dtype in KERNEL_DTYPES]
    replacements: dict[int, DenseCpuLinear] = {}  # a module registered under two names gets one replacement
    for name, mod in targets:
        new = replacements.setdefault(id(mod), DenseCpuLinear.from_linear(mod))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in targets]
