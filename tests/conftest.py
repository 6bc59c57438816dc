"""Shared fixtures: the ../shared data and tiny models, and tiny random models of every supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSEFAST_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo_cache():
    """Every compiled decode step compiles one code object (LlamaBatchRunner.decode_static), whose dynamo cache takes
    at most recompile_limit (8) graphs in a process; a server builds one engine, a test run dozens: each test module
    starts with that cache empty, so how many steps earlier modules compiled does not decide whether one fails."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (set SPARSEFAST_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def story_llama_dir(shared_dir) -> Path:
    """A small trained LlamaForCausalLM (2 layers, hidden 128, GQA 8/4 heads, vocab 2048) with its tokenizer."""
    return shared_dir / "models" / "learninglm-story-llama"


TINY_FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt_neox")


def tiny_config(family: str, **overrides):
    """A tiny random config of `family` (2 layers, hidden 64, GQA where the family has it). Overrides go to the
    config's constructor, so derived fields (e.g. Qwen2's per-layer `layer_types`) follow them."""
    import transformers as tf

    common = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=256)
    gqa = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    families = {
        "llama": (tf.LlamaConfig, gqa),
        "mistral": (tf.MistralConfig, gqa),
        "qwen2": (tf.Qwen2Config, gqa),
        "opt": (tf.OPTConfig, dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)),
        "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
    }
    if family not in families:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(families)}")
    cls, shape = families[family]
    return cls(**{**common, **shape, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()
