"""Linear-layer shapes (out_features, in_features) of the reference models, the one source for every benchmark.

From the public configs: LLaMA-7B (hidden 4096, intermediate 11008, 32 heads), LLaMA-13B (5120, 13824, 40 heads),
LLaMA-70B / Llama-2-70B (8192, 28672, 64 heads, 8 KV heads, head_dim 128), Llama-3-8B (4096, 14336, 32 heads,
8 KV heads, head_dim 128): MODELS, the GPU benchmarks' shapes. SmolLM2-135M (hidden 576, intermediate 1536, 9 query
/ 3 KV heads of 64): the CPU benchmarks' small model. Grouped linears share a shape (qkvo_proj: q, k, v and o of
LLaMA-1/2; with GQA k/v are smaller and listed apart).

RANDOM_MODELS: whole LlamaForCausalLM configs of those shapes, built with random bf16 weights by `build_model` (the
pruning-speed and decode benchmarks on a GPU: nothing to download, and no kernel's work depends on the values).

Quick mode (no CUDA: CI and bench/gpu/run.sh --dry-run) replaces the LLaMA shapes by QUICK_SHAPES, two tiny odd ones,
so the harness, the baselines and the JSON writer stay exercised; those timings mean nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "llama-7b": {"qkvo_proj": (4096, 4096), "gate_up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "llama-13b": {"qkvo_proj": (5120, 5120), "gate_up_proj": (13824, 5120), "down_proj": (5120, 13824)},
    "llama-70b": {"qo_proj": (8192, 8192), "kv_proj": (1024, 8192), "gate_up_proj": (28672, 8192),
                  "down_proj": (8192, 28672)},
    "llama-3-8b": {"qo_proj": (4096, 4096), "kv_proj": (1024, 4096), "gate_up_proj": (14336, 4096),
                   "down_proj": (4096, 14336)},
}

# how many of each shape one decoder layer holds (q,k,v,o / gate,up / down)
PER_LAYER: dict[str, dict[str, int]] = {
    "llama-7b": {"qkvo_proj": 4, "gate_up_proj": 2, "down_proj": 1},
    "llama-13b": {"qkvo_proj": 4, "gate_up_proj": 2, "down_proj": 1},
    "llama-70b": {"qo_proj": 2, "kv_proj": 2, "gate_up_proj": 2, "down_proj": 1},
    "llama-3-8b": {"qo_proj": 2, "kv_proj": 2, "gate_up_proj": 2, "down_proj": 1},
}

NUM_LAYERS = {"llama-7b": 32, "llama-13b": 40, "llama-70b": 80, "llama-3-8b": 32}

SMOLLM2: dict[str, tuple[int, int]] = {"q_o_proj": (576, 576), "k_v_proj": (192, 576), "gate_up_proj": (1536, 576),
                                       "down_proj": (576, 1536)}
CPU_MODELS = {"smollm2": SMOLLM2, **MODELS}
QUICK_SHAPES = [("tiny", "odd", 5, 96), ("tiny", "wide", 3, 520)]


def all_shapes() -> list[tuple[str, str, int, int]]:
    """[(model, linear, out, in)] for every distinct shape of MODELS."""
    return select_shapes(None)


def select_shapes(models: str | None, table: dict[str, dict[str, tuple[int, int]]] = MODELS,
                  ) -> list[tuple[str, str, int, int]]:
    """[(model, linear, out, in)] of the models in the comma list `models` (None or "": every model of `table`), in
    `table`'s order; unknown names are an error. `table`: MODELS, or CPU_MODELS for the CPU benchmarks."""
    names = [m.strip() for m in (models or "").split(",") if m.strip()] or list(table)
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)} in the shape list; choose from {', '.join(table)}")
    return [(m, name, o, i) for m, d in table.items() if m in names for name, (o, i) in d.items()]


def quick_mode() -> bool:
    """True without CUDA: the microbenchmarks then run QUICK_SHAPES on the CPU (module docstring)."""
    import torch

    return not torch.cuda.is_available()


def bench_shapes() -> list[tuple[str, str, int, int]]:
    """The microbenchmarks' shapes: every distinct LLaMA shape on CUDA (only the models named in $BENCH_MODELS, a
    comma list, when set), QUICK_SHAPES in quick mode."""
    return QUICK_SHAPES if quick_mode() else select_shapes(os.environ.get("BENCH_MODELS"))


def shape_id(shape: tuple[str, str, int, int]) -> str:
    """"llama-7b-down_proj-4096x11008": a shape's test id and row label."""
    return f"{shape[0]}-{shape[1]}-{shape[2]}x{shape[3]}"


# whole LLaMA-shaped models with random weights: timings do not depend on the values, and nothing is downloaded
RANDOM_MODELS = {"llama-7b-random": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
                 # the dry run of bench/gpu/run.sh: same code path, shapes small enough for a CPU
                 "llama-tiny-random": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                           num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)}
FULL_LAYERS = {"llama-7b-random": 32}


def build_model(name: str, layers: int | None, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(model in eval mode on `device`, description). *-random models are built on the device in bf16 with `layers`
    decoder layers (default 4); any other name is loaded with sparsefast.models.load_model."""
    import torch

    if name in RANDOM_MODELS:
        import transformers

        n = 4 if layers is None else layers
        if n < 1:
            raise ValueError(f"--layers must be >= 1, got {n}")
        cfg = transformers.LlamaConfig(num_hidden_layers=n, **RANDOM_MODELS[name])
        with device:
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        return model.eval(), f"{name}: LlamaForCausalLM, LLaMA-7B shapes, {n} layers, random bf16 weights"
    if layers is not None:
        raise ValueError("--layers applies only to *-random models; a loaded checkpoint keeps its layers")
    from sparsefast.models import load_model

    model, _ = load_model(name, device=device)
    return model, f"{name} ({model.config.num_hidden_layers} layers, {next(model.parameters()).dtype})"
