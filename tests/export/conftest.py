"""Fixtures of the export tests: the tiny story llama as loaded by sparsefast, and structurally pruned copies of it
(layer-wise and uniform), pruned with weight-magnitude importance (no calibration data, a few seconds)."""

from __future__ import annotations

import pytest

import sparsefast
from sparsefast.config.structural import StructuralConfig
from sparsefast.prune.structural import prune_structured


def pruned_story(story_llama_dir, **config):
    """(model, tokenizer): the story llama after `prune_structured` with l2 importance and `config`."""
    model, tok = sparsefast.load(str(story_llama_dir))
    prune_structured(model, tok, StructuralConfig(importance="l2", **config))
    return model, tok


@pytest.fixture()
def story(story_llama_dir):
    return sparsefast.load(str(story_llama_dir))


@pytest.fixture()
def story_layerwise(story_llama_dir):
    """Layer 1 loses 4 of 8 query heads (2 of 4 KV groups' worth, GQA divisible) and 115 of 384 MLP channels;
    layer 0 is untouched: per-layer widths differ."""
    return pruned_story(story_llama_dir, ratio=0.3, layers="1-1")


@pytest.fixture()
def story_kv_groups(story_llama_dir):
    """Layer 1 loses whole KV groups (kv_groups): fewer KV heads there than in layer 0."""
    return pruned_story(story_llama_dir, ratio=0.5, layers="1-1", gqa="kv_groups")
