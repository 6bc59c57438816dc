"""Linear-layer shapes (out_features, in_features) of the reference models, the one source for every benchmark.

From the public configs: LLaMA-7B (hidden 4096, intermediate 11008, 32 heads), LLaMA-13B (5120, 13824, 40 heads),
LLaMA-70B / Llama-2-70B (8192, 28672, 64 heads, 8 KV heads, head_dim 128), Llama-3-8B (4096, 14336, 32 heads,
8 KV heads, head_dim 128). q/k/v are listed separately; o_proj equals q_proj's transpose shape.
"""

from __future__ import annotations

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


def all_shapes() -> list[tuple[str, str, int, int]]:
    """[(model, linear, out, in)] for every distinct shape."""
    return [(m, name, o, i) for m, d in MODELS.items() for name, (o, i) in d.items()]


def select_shapes(models: str | None) -> list[tuple[str, str, int, int]]:
    """all_shapes() of the models in the comma list `models` (None or "": every model); unknown names are an error."""
    if not models:
        return all_shapes()
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)} in the shape list; choose from {', '.join(MODELS)}")
    return [s for s in all_shapes() if s[0] in names]
