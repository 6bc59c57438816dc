"""The config class of a sparsefast `--to vllm` export with per-layer widths, copied into the export directory as
`configuration_decilm.py` (config.json's `auto_map` names it). transformers does not know the `nemotron-nas` model
type, so vLLM reads this file when started with `--trust-remote-code`; it only parses the config: no weights, no
model code.

vLLM's nemotron_nas model reads `config.block_configs[i].attention.n_heads_in_group` and
`config.block_configs[i].ffn.intermediate_size` as attributes; this class turns config.json's dicts into such
objects and back. It imports transformers only (not sparsefast), so it works wherever vLLM runs.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import LlamaConfig


class BlockConfig:
    """One decoder layer: `attention` (n_heads_in_group, no_op, replace_with_linear) and `ffn` (intermediate_size,
    no_op, replace_with_linear), each readable as attributes."""

    def __init__(self, attention: dict[str, Any], ffn: dict[str, Any]) -> None:
        self.attention = SimpleNamespace(**attention)
        self.ffn = SimpleNamespace(**ffn)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"attention": dict(vars(self.attention)), "ffn": dict(vars(self.ffn))}


class DeciLMConfig(LlamaConfig):
    """LlamaConfig plus per-layer `block_configs` (model type `nemotron-nas`, architecture DeciLMForCausalLM)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs: Any) -> None:
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
