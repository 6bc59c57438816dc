"""sparsefast.recover.train: LoRA lowers the loss, a NaN loss stops the run, and the zeros of a 2:4 model survive
the merge exactly (RecoverConfig's own checks: tests/config/test_recover.py)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.recover import (
    NonFiniteLossError,
    RecoverConfig,
    collate,
    load_recovery_data,
    lora_recover,
    tokenize_recovery_data,
)
from tests.recover.helpers import ALPACA, load_story, prune_24


@pytest.fixture()
def story(story_llama_dir):
    return load_story(story_llama_dir)


def _batch_loss(model, samples, pad_id) -> float:
    b = collate(samples, pad_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             b["labels"][:, 1:].reshape(-1), ignore_index=-100).item()


def test_recovery_lowers_training_loss(story):
    model, tok = story
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    before = _batch_loss(model, samples, tok.pad_token_id)
    cfg = RecoverConfig(epochs=6, lr=3e-3, batch_size=4, grad_accum=1, lora_dropout=0.0, warmup_ratio=0.0)
    model, stats = lora_recover(model, tok, samples, cfg, progress=False)
    after = _batch_loss(model, samples, tok.pad_token_id)
    assert after < before - 0.1, (before, after)
    assert stats["optimizer_steps"] == 12 and stats["last_loss"] < stats["first_loss"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: no adapter modules left
    assert type(model).__name__ == "LlamaForCausalLM"


def test_nan_loss_stops_with_clear_error(story):
    model, tok = story
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    calls = []

    def poison(module, args, output):  # the 3rd forward goes NaN, as an fp16 overflow would
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    model.model.layers[1].mlp.down_proj.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at optimizer step 3/4 .*nothing was saved"):
        lora_recover(model, tok, samples, RecoverConfig(batch_size=4, grad_accum=1), progress=False)


@pytest.mark.parametrize("dtype,checkpointing", [("fp32", False), ("bf16", True)])
def test_24_pattern_survives_recovery_exactly(story, dtype, checkpointing):
    model, tok = story
    cfg = RecoverConfig(epochs=1, lr=5e-3, batch_size=4, grad_accum=1, dtype=dtype,
                        gradient_checkpointing=checkpointing, warmup_ratio=0.0)
    masks = prune_24(model, cfg.target_modules)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    model, stats = lora_recover(model, tok, samples, cfg, progress=False)
    assert stats["masked_linears"] == len(masks) == 14 and stats["masked_weights_refilled_then_zeroed"] > 0
    for name, zero in masks.items():
        w = model.get_submodule(name).weight
        assert w.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        assert torch.equal(w == 0, zero), name  # exactly the same zeros: 2 of every 4
        assert not torch.allclose(w.float(), before[name], atol=1e-6), name  # the LoRA update was merged
    assert all(torch.isfinite(p).all() for p in model.parameters())
