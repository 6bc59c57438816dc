"""sparsefast's vLLM plugin: serves `sparsefast export --to vllm-sparse` checkpoints (format in
sparsefast.export.vllm_sparse) in vLLM with sparsefast's CPU kernels.

vLLM finds it through the `vllm.general_plugins` entry point (pyproject.toml) in every process it starts (API server,
engine core, workers), so sparsefast must be installed in vLLM's environment (`bash bench/peers/vllm_cpu.sh VENV`
does it); `register()` loads the kernels and registers the quantization method "sparsefast", which a checkpoint's
`quantization_config.quant_method` selects (no --quantization flag needed).

Per linear layer vLLM builds, `SparsefastConfig.get_quant_method` returns vLLM's own dense method for the layers the
checkpoint keeps dense and a `SparsefastLinearMethod` for packed ones. Loading: vLLM maps each checkpoint tensor
(`...q_proj.values`) to the fused layer's parameter (`...qkv_proj.values`, shard "q") and calls that parameter's
weight loader, which here only keeps the tensor; once all are loaded, `process_weights_after_loading` unpacks each
member (exact), takes this tensor-parallel rank's slice (`rank_slice`), concatenates the members in vLLM's order and
packs the result again: the layer holds one packed weight, and `apply` is one call of the registered op
(torch.ops.sparsefast.sparse24_linear_cpu / sparse_unstructured_linear_cpu, fake kernels registered, so vLLM's
torch.compile of the model traces through it). The kernels take every number of tokens; for long prefills vLLM's
dense GEMM would be faster (sparsefast serve switches to it by a measured table), which a traced graph cannot do per
call, so prefill runs the sparse kernel too.

Tensor parallelism: each rank packs its own slice, so every split vLLM makes works for the unstructured layout; for
2:4, column-parallel layers (qkv_proj, gate_up_proj: output rows split) take any split, row-parallel ones (o_proj,
down_proj: input columns split) need in_features / tensor-parallel size to be a multiple of 4 (whole 4-groups per
rank; refused at load otherwise). Checked against the unsharded layer in tests/export/test_vllm_sparse.py (vLLM
itself refuses SmolLM2, 9 heads over 3 KV heads, on 2 ranks, so the CPU runs here are single-process).

CPU only: on another device the layer raises at load (the CUDA 2:4 kernels have their own layout and are not wired
here yet).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

from sparsefast.export.vllm_sparse import (
    FORMAT_VERSION,
    FUSED_LAYERS,
    INDEX_DTYPES,
    LAYOUTS,
    PACKED_NAMES,
    QUANT_METHOD,
    pack,
    rank_slice,
    unpack,
)

_EXPORT_HINT = "export the model again with `sparsefast export MODEL --to vllm-sparse`"


def register() -> None:
    """The entry point: load the CPU kernels (their ops and fake kernels) and register the "sparsefast" method.
    Idempotent (vLLM calls it once per process; a second registration replaces the first)."""
    from sparsefast._ext import load_cpu_extension

    load_cpu_extension()
    register_quantization_config(QUANT_METHOD)(SparsefastConfig)


class SparsefastConfig(QuantizationConfig):
    """The checkpoint's `quantization_config`: `layers` {checkpoint linear name: {"layout", "shape"}}, the packed
    values stored as `values_dtype`."""

    def __init__(self, layers: dict[str, dict[str, Any]], values_dtype: torch.dtype) -> None:
        super().__init__()
        self.layers, self.values_dtype = layers, values_dtype

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # not consulted on CPU, the only device this method runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SparsefastConfig":
        from sparsefast._ext import cpu_extension_error, load_cpu_extension

        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"sparsefast checkpoint format {version!r}; this sparsefast reads format "
                             f"{FORMAT_VERSION}: {_EXPORT_HINT}")
        layers = config.get("layers")
        values_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.get("values_dtype"))
        if not isinstance(layers, dict) or values_dtype is None:
            raise ValueError(f"sparsefast quantization_config lacks its 'layers' table or 'values_dtype': "
                             f"{_EXPORT_HINT}")
        for name, spec in layers.items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if (not isinstance(spec, dict) or spec.get("layout") not in LAYOUTS or not isinstance(shape, list)
                    or len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape)):
                raise ValueError(f"sparsefast quantization_config: layer {name!r} has {spec!r}, not "
                                 f"{{'layout': one of {LAYOUTS}, 'shape': [out, in]}}: {_EXPORT_HINT}")
        if not load_cpu_extension():
            raise ValueError(f"sparsefast's CPU kernels are not available in vLLM's environment "
                             f"({cpu_extension_error()}); install sparsefast there with a C++ compiler")
        return cls(layers, values_dtype)

    def members(self, prefix: str) -> list[str]:
        """The checkpoint linears vLLM's layer `prefix` runs (q/k/v for a qkv_proj), in vLLM's shard order."""
        parent, _, leaf = prefix.rpartition(".")
        fused = {**dict(FUSED_LAYERS), **{k: tuple(v) for k, v in self.packed_modules_mapping.items()}}
        if leaf not in fused:
            return [prefix]
        return [f"{parent}.{m}" if parent else m for m in fused[leaf]]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, the head, attention: vLLM's own (dense) methods
        members = self.members(prefix)
        specs = [self.layers.get(m) for m in members]
        if all(spec is None for spec in specs):
            return UnquantizedLinearMethod()
        if any(spec is None for spec in specs) or len({spec["layout"] for spec in specs}) != 1:
            raise ValueError(f"vLLM runs {', '.join(members)} as one layer ({prefix}), but the checkpoint stores them "
                             f"in different layouts ({specs}): {_EXPORT_HINT}")
        return SparsefastLinearMethod(prefix, specs[0]["layout"], members,
                                      [tuple(spec["shape"]) for spec in specs], self.values_dtype)


class SparsefastLinearMethod(LinearMethodBase):
    """One packed layer: its members' packed tensors are kept as they load, then unpacked, sliced for this rank,
    concatenated and packed again (module docstring); `apply` calls the kernel op."""

    def __init__(self, prefix: str, layout: str, members: list[str], shapes: list[tuple[int, int]],
                 values_dtype: torch.dtype) -> None:
        self.prefix, self.layout, self.members, self.shapes = prefix, layout, members, shapes
        self.values_dtype = values_dtype

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if len(output_partition_sizes) != len(self.members):
            raise ValueError(f"{self.prefix}: vLLM builds {len(output_partition_sizes)} outputs, the checkpoint has "
                             f"{len(self.members)} members ({', '.join(self.members)})")
        extra_weight_attrs.pop("weight_loader", None)
        layer.sparsefast_loaded = {}  # {tensor name: {shard id: tensor}} until process_weights_after_loading
        layer.sparsefast_parts = list(output_partition_sizes)
        layer.sparsefast_in = input_size_per_partition
        layer.sparsefast_dtype = params_dtype
        for name in PACKED_NAMES[self.layout]:  # placeholders of the stored dtypes (vLLM warns on a mismatch)
            param = Parameter(torch.empty(0, dtype=INDEX_DTYPES.get(name, self.values_dtype)), requires_grad=False)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": partial(_keep, layer, name)})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.sparsefast_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{self.prefix}: sparsefast's kernels take float32 or bfloat16, not "
                             f"{layer.sparsefast_dtype}; start vLLM with --dtype float32 or bfloat16")
        loaded: dict[str, dict[Any, torch.Tensor]] = layer.sparsefast_loaded
        device = layer.values.device  # where vLLM built the layer (loaded tensors arrive on the CPU whatever it is)
        if device.type != "cpu":
            raise ValueError(f"{self.prefix}: sparsefast's vLLM layers run the CPU kernels only; this layer is on "
                             f"{device}")
        row_parallel = isinstance(layer, RowParallelLinear)
        if self.layout == "2:4" and row_parallel and layer.sparsefast_in % 4:
            raise ValueError(f"{self.prefix}: tensor parallelism splits its {layer.sparsefast_in * layer.tp_size} "
                             f"inputs into {layer.sparsefast_in} per rank, which cuts 2:4 groups of 4; choose a "
                             "--tensor-parallel-size that divides in_features / 4")
        slices = []
        for i, (shard, member, shape) in enumerate(zip(_shard_ids(layer, len(self.members)), self.members,
                                                       self.shapes)):
            packed = []
            for name in PACKED_NAMES[self.layout]:
                tensor = loaded.get(name, {}).get(shard)
                if tensor is None:
                    raise ValueError(f"the checkpoint has no {member}.{name} ({self.layout} layout): {_EXPORT_HINT}")
                packed.append(tensor)
            weight = unpack(tuple(packed), self.layout, *shape)
            size = layer.sparsefast_in if row_parallel else layer.sparsefast_parts[i]
            replicas = getattr(layer, "num_kv_head_replicas", 1) if shard in ("k", "v") else 1
            slices.append(rank_slice(weight, rank=layer.tp_rank, row_parallel=row_parallel, size=size,
                                     kv_replicas=replicas))
        weight = torch.cat(slices).to(layer.sparsefast_dtype)
        for name, tensor in zip(PACKED_NAMES[self.layout], pack(weight, self.layout)):
            replace_parameter(layer, name, tensor)
        from sparsefast.ops.sparse24_cpu import cpu_isa

        layer.sparsefast_shape = tuple(weight.shape)
        layer.sparsefast_isa = cpu_isa()
        del layer.sparsefast_loaded

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_features, in_features = layer.sparsefast_shape
        if self.layout == "2:4":
            return torch.ops.sparsefast.sparse24_linear_cpu(x, layer.values, layer.meta, bias, out_features,
                                                            in_features, layer.sparsefast_isa, None, False)
        return torch.ops.sparsefast.sparse_unstructured_linear_cpu(x, layer.values, layer.mask, layer.tile_offsets,
                                                                   bias, out_features, in_features,
                                                                   layer.sparsefast_isa, None, False)


def _keep(layer: torch.nn.Module, name: str, param: Parameter, loaded_weight: torch.Tensor,
          loaded_shard_id: Any = None) -> None:
    """The weight loader of a packed parameter: vLLM calls it per checkpoint tensor (with the member's shard id
    for a fused layer); the tensor is kept until every member has arrived."""
    layer.sparsefast_loaded.setdefault(name, {})[loaded_shard_id] = loaded_weight.detach().clone()


def _shard_ids(layer: torch.nn.Module, members: int) -> list[Any]:
    """The shard ids vLLM's loader passes for a layer's members, in order."""
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(members))
    return [None]
