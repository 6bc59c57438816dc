"""What the recovery tests (tests/recover/, tests/cli/test_recover.py) share: the fixture data, the trained tiny story
llama in fp32, and a 2:4 magnitude prune of its target linears."""

from __future__ import annotations

from pathlib import Path

import torch

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "recover"
ALPACA = FIX / "alpaca_small.jsonl"


def load_story(story_llama_dir: Path):
    """(model in fp32 eval mode, tokenizer) of the shared story llama, with torch's seed reset for LoRA init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(story_llama_dir)


def prune_24(model, targets) -> dict[str, torch.Tensor]:
    """Magnitude 2:4 along the input dimension of every target linear; returns the zero masks."""
    from sparsefast.recover import target_linears

    masks = {}
    with torch.no_grad():
        for name, lin in target_linears(model, targets).items():
            w = lin.weight.view(lin.weight.shape[0], -1, 4)
            drop = w.abs().argsort(-1)[..., :2]
            w.scatter_(-1, drop, 0.0)
            masks[name] = lin.weight == 0
    return masks
