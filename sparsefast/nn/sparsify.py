"""`sparsify_(model, config, filter_fn)`: the one public entry point that swaps a model's nn.Linear layers for sparse
modules, in torchao's `sparsify_` shape, and its `SparsifyConfig`.

Modes (the serving modes of `sparsefast.load(sparse=...)`, `sparsefast serve --sparse` and `sparsefast generate
--sparse`):

* ``auto``: per layer, by the device its weight is on. CUDA: a 2:4 weight becomes a `Sparse24Linear`, whose measured
  table for that GPU picks the kernel per number of tokens. CPU: a weight with at least MIN_SPARSITY zeros gets the
  fastest of dense / 2:4 / unstructured as timed on this machine (`choose_sparse_layer`), a `SparseLinear` where a
  layout wins, else it stays nn.Linear; `calibrate=False` skips the timing (2:4 where the weight fits, else
  unstructured, with the default CPU table).
* ``sparse24``: every 2:4 linear becomes a `Sparse24Linear`, on any device, without timing.
* ``off``: the model is left as it is.

Two module classes, one dispatch (sparsefast.nn.dispatch decides which kernel each runs): `Sparse24Linear` stores the
CUDA kernels' layout (mma.sp fragment order), the form a model that is or will be on a GPU needs, and derives a CPU
or dense copy when it runs elsewhere; `SparseLinear` stores only a CPU kernel layout (the 2:4 tile layout, or the
unstructured bitmask layout that has no CUDA kernel at all) and carries the table measured for it on this machine.
Merging them would make one module hold two unrelated storage formats and two table lifecycles.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sparsefast._ext import load_cpu_extension
from sparsefast.config.sparsify import SparsifyConfig
from sparsefast.nn.dense_linear import use_dense_cpu_kernels_
from sparsefast.nn.dispatch import DispatchTable, calibrate_cpu_dispatch, fastest_cpu_layout, load_dispatch_table
from sparsefast.nn.sparse24_linear import Sparse24Linear
from sparsefast.nn.sparse_linear import SparseLinear
from sparsefast.ops.int8_rows import quantized_modules
from sparsefast.ops.sparse24 import check_sparse24, is_sparse24
from sparsefast.ops.sparse24_cpu import KERNEL_DTYPES, int8_activation_kernels
from sparsefast.ops.sparse_unstructured import weight_sparsity

MIN_SPARSITY = 0.3  # below this neither CPU layout moves fewer bytes enough to be worth timing (0.7 + 1/32 of dense)


def choose_sparse_layer(linear: nn.Linear, *, calibrate: bool = True,
                        int8_activations: bool = False) -> tuple[nn.Module, dict]:
    """The fastest of dense (the layer itself) / 2:4 / unstructured for a CPU `linear`, by timings on this machine.

    Returns (module, record): module is `linear` unchanged when no sparse layout beats dense at any calibrated M;
    record: {"sparsity", "candidates": {layout: {"table", "timings"}}, "chosen": "dense" | "2:4" | "unstructured",
    and for a swap "dense_ms_sum", "keeps_dense"}. calibrate=False skips timing: 2:4 where the weight fits it, else
    unstructured, with DEFAULT_CPU_DISPATCH. int8_activations (an int8-quantized linear): every candidate, dense
    included, with x quantized to int8.
    """
    weight = linear.weight.detach()
    sparsity = weight_sparsity(weight)
    layouts = (["2:4"] if is_sparse24(weight) else []) + ["unstructured"]
    record: dict = {"sparsity": round(sparsity, 4), "candidates": {}}
    if not calibrate:
        record["chosen"] = layouts[0]
        return SparseLinear.from_dense(linear, layouts[0], int8_activations=int8_activations), record
    layers: dict[str, SparseLinear] = {}
    measured: dict[str, tuple[DispatchTable, dict]] = {}
    for layout in layouts:
        layer = layers[layout] = SparseLinear.from_dense(linear, layout, int8_activations=int8_activations)
        packed = layer.packed()

        def kernel_copy(packed=packed, layout=layout, bias=layer.bias,
                        scales=layer.scales) -> Callable[[torch.Tensor], torch.Tensor]:
            # A new layer over clones of the packed weight (the calibration times each copy from DRAM), called as a
            # swapped layer's forward calls it; the torch twin where the kernels cannot run.
            copy = SparseLinear(linear.in_features, linear.out_features, layout, tuple(t.clone() for t in packed),
                                bias, scales=scales, int8_activations=int8_activations)
            runs = load_cpu_extension() and (not int8_activations or int8_activation_kernels())
            return copy.kernel_call() if runs else copy.kernel

        # the stored values a kernel reads (and how it reads x)
        values = str(weight.dtype) if layer.scales is None else "int8+int8 activations" if int8_activations else "int8"
        key = (tuple(weight.shape), values, layout, round(sparsity, 2))
        measured[layout] = calibrate_cpu_dispatch(kernel_copy, sum(t.numel() * t.element_size() for t in packed),
                                                  weight, key=key, dense_scales=layer.scales,
                                                  int8_activations=int8_activations)
        table, timings = measured[layout]
        record["candidates"][layout] = {"table": [list(r) for r in table.rows], "timings": timings}
    chosen = fastest_cpu_layout(measured)
    if chosen is None:
        record["chosen"] = "dense"
        return linear, record
    layer, (table, timings) = layers[chosen], measured[chosen]  # the candidate already packed: not packed again
    keep_dense = any(b == "dense" for _, b in table.rows)
    record.update(chosen=chosen, dense_ms_sum=sum(t["dense_ms"] for t in timings.values()), keeps_dense=keep_dense)
    return SparseLinear(linear.in_features, linear.out_features, chosen, layer.packed(), layer.bias, table,
                        weight if keep_dense else None, layer.scales, int8_activations), record


def _swap_kind(name: str, linear: nn.Linear, mode: str) -> str:
    """"sparse24" (a Sparse24Linear) or "cpu" (choose_sparse_layer) for this layer under `mode`."""
    device = linear.weight.device
    if mode == "sparse24" or device.type == "cuda":
        return "sparse24"
    if device.type != "cpu":
        raise ValueError(f"sparsify_: layer {name!r} is on {device}; mode 'auto' swaps CUDA and CPU layers only "
                         "(use SparsifyConfig(mode='sparse24') or 'off')")
    return "cpu"


def sparsify_(model: nn.Module, config: SparsifyConfig | None = None,
              filter_fn: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, dict]:
    """Replace nn.Linear modules of `model` in place by sparse modules per `config` (default SparsifyConfig()).

    filter_fn(name, linear) selects the candidate layers; default: every 2:4 linear for a Sparse24Linear, every CPU
    linear with at least MIN_SPARSITY zeros for the measured CPU choice (so a dense, e.g. embedding-tied, head is left
    alone). A selected layer that is to become a Sparse24Linear must be 2:4 sparse: ValueError naming the first that
    is not, raised before anything is swapped. Returns {name: record} for every candidate: its "sparsity" and
    "chosen" module ("sparse24": Sparse24Linear; "2:4" / "unstructured": SparseLinear; "dense": left as nn.Linear),
    plus the CPU timings (see choose_sparse_layer).
    """
    config = config if config is not None else SparsifyConfig()
    if config.int8_activations:
        check_int8_activations(model)
    if config.mode == "off":
        return {}
    table = load_dispatch_table(config.dispatch_table) if config.dispatch_table is not None else None
    chosen: list[tuple[str, nn.Linear, str]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        kind = _swap_kind(name, mod, config.mode)
        weight = mod.weight.detach()
        if filter_fn is None:
            wanted = is_sparse24(weight) if kind == "sparse24" else weight_sparsity(weight) >= MIN_SPARSITY
        else:
            wanted = filter_fn(name, mod)
            if wanted and kind == "sparse24":
                try:
                    check_sparse24(weight)
                except ValueError as exc:
                    raise ValueError(f"sparsify_: layer {name!r}: {exc}") from None
        if wanted:
            chosen.append((name, mod, kind))
    records: dict[str, dict] = {}
    for name, mod, kind in chosen:
        if kind == "sparse24":
            new = Sparse24Linear.from_dense(mod, table)
            records[name] = {"sparsity": round(weight_sparsity(mod.weight.detach()), 4), "chosen": "sparse24"}
        else:
            new, records[name] = choose_sparse_layer(mod, calibrate=config.calibrate,
                                                     int8_activations=config.int8_activations)
        if new is not mod:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if config.mode == "auto":
        use_dense_cpu_kernels_(model, int8_activations=config.int8_activations)
    return records


def check_int8_activations(model: nn.Module) -> None:
    """ValueError unless int8 activations can apply to `model`: an int8-quantized model (prune --quantize int8) in
    float32 or bfloat16 on the CPU (the mode, "auto", is SparsifyConfig's check)."""
    names = quantized_modules(model)
    if not names:
        raise ValueError("int8 activations need an int8-quantized model (weights with per-row scales): prune it "
                         "with --quantize int8 first, or drop --int8-activations")
    dtype = model.get_submodule(names[0]).weight.dtype
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"int8 activations run on float32 or bfloat16 models (the CPU modules that carry them), not "
                         f"{dtype}; load with --dtype float32 or bfloat16")
    elsewhere = [name for name, mod in model.named_modules()
                 if isinstance(mod, nn.Linear) and mod.weight.device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"int8 activations are a CPU path; layer {elsewhere[0]!r} is on "
                         f"{model.get_submodule(elsewhere[0]).weight.device}: load the model on the CPU")


def swapped_layer_names(records: dict[str, dict]) -> list[str]:
    """The names of the layers that sparsify_ replaced, given its records (every choice but "dense")."""
    return [name for name, record in records.items() if record["chosen"] != "dense"]


def swap_linear_with_sparse(model: nn.Module, filter_fn: Callable[[str, nn.Linear], bool] | None = None, *,
                            calibrate: bool = True) -> dict[str, dict]:
    """`sparsify_(model, SparsifyConfig(calibrate=calibrate), filter_fn)` for a model on the CPU: the name the README
    documents for the measured CPU swap. ValueError, before anything is swapped, when a linear is elsewhere."""
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and mod.weight.device.type != "cpu":
            raise ValueError(f"swap_linear_with_sparse swaps CPU layers only; layer {name!r} is on "
                             f"{mod.weight.device}: use sparsefast.nn.sparsify_(model) for CUDA (2:4 Sparse24Linear)")
    return sparsify_(model, SparsifyConfig(calibrate=calibrate), filter_fn)
