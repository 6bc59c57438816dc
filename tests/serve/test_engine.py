"""GenerationEngine output against transformers' generate, token for token (greedy), on the tiny story llama:
dense, structurally pruned (different head counts and MLP widths per layer), 2:4 magnitude-pruned, and prompts of
different lengths served concurrently; both runners (batched LLaMA runner and the per-request HF fallback)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.serve.engine import GenerationEngine, SamplingParams

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Tom had a red ball. He",
           "Lily", "One day, a girl named Sue went to the shop with her mom. She wanted to buy"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _load(story_llama_dir):
    from sparsefast.api import load

    return load(story_llama_dir)


@pytest.fixture(scope="module")
def dense(story_llama_dir):
    return _load(story_llama_dir)


def reference(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, never stopping at EOS (as ignore_eos=True)."""
    ids = tokenizer(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def served_alone(model, tokenizer, prompts, params=GREEDY, **engine_kw) -> list[list[int]]:
    engine = GenerationEngine(model, tokenizer, max_model_len=128, **engine_kw)
    engine.start()
    try:
        return [engine.generate(tokenizer(p)["input_ids"], params) for p in prompts]
    finally:
        engine.shutdown()


def served_together(model, tokenizer, prompts, params_list, **engine_kw) -> list[list[int]]:
    """All requests queued before the engine starts: its first step admits max_batch of them at once (one padded
    prefill of prompts of different lengths); the rest join as slots free up."""
    engine = GenerationEngine(model, tokenizer, max_model_len=128, **engine_kw)
    try:
        streams = [engine.submit(tokenizer(p)["input_ids"], sp) for p, sp in zip(prompts, params_list)]
        engine.start()
        return [[t for ev in s for t in ev.token_ids] for s in streams]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_greedy_matches_generate_dense(dense, runner):
    model, tok = dense
    got = served_alone(model, tok, PROMPTS[:3], runner=runner)
    assert got == [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:3]]


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_concurrent_prompts_of_different_lengths_match_single_requests(dense, runner):
    """5 prompts, 3 slots, different max_tokens: requests join mid-flight as others leave, and rows at different
    positions decode in one batch; each must equal its own single-request output."""
    model, tok = dense
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (7, 20, 13, 24, 5)]
    together = served_together(model, tok, PROMPTS, params, max_batch=3, runner=runner)
    assert together == [reference(model, tok, p, sp.max_tokens) for p, sp in zip(PROMPTS, params)]


def test_structural_checkpoint_with_per_layer_widths(story_llama_dir, tmp_path):
    """Layer 0 loses half its KV groups (kv_groups mode) and MLP channels, layer 1 stays dense; the engine's cache
    is sized per layer. Saved and reloaded through the structural checkpoint path, as `sparsefast serve` loads it."""
    from sparsefast.api import load
    from sparsefast.prune.structural import prune_structured
    from sparsefast.prune.structural.checkpoint import save_structural
    from sparsefast.prune.structural.config import StructuralConfig

    model, tok = _load(story_llama_dir)
    prune_structured(model, tok, StructuralConfig(ratio=0.5, importance="l2", layers="0-0", gqa="kv_groups"))
    save_structural(model, tmp_path / "struct", tokenizer=tok)
    model, tok = load(tmp_path / "struct")
    layers = model.model.layers
    widths = [(lay.self_attn.q_proj.out_features, lay.self_attn.k_proj.out_features, lay.mlp.up_proj.out_features)
              for lay in layers]
    assert widths[0] != widths[1] and widths[0][1] < widths[1][1], widths
    engine = GenerationEngine(model, tok, max_model_len=64)
    assert [k.shape[1] for k in engine.runner.cache.keys] == [w[1] // 16 for w in widths]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 9, 12)]
    together = served_together(model, tok, PROMPTS[:3], params, max_batch=2)
    assert together == [reference(model, tok, p, sp.max_tokens) for p, sp in zip(PROMPTS[:3], params)]


def test_two_four_mask_pruned_model(story_llama_dir):
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig

    model, tok = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    assert served_alone(model, tok, PROMPTS[:2]) == [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]


def test_opt_family_uses_the_hf_runner():
    """Families without the LLaMA layout fall back to the per-request HF runner and still match generate."""
    from tests.conftest import tiny_model

    model = tiny_model("opt")

    class ByteTokenizer:
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = GenerationEngine(model, ByteTokenizer(), max_model_len=64)
    assert type(engine.runner).__name__ == "HFRequestRunner"
    engine.start()
    try:
        prompt = [5, 17, 33, 4]
        got = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert got == ref[0, 4:].tolist()


def test_sparse24_swap_decodes_the_same_tokens(story_llama_dir):
    """prepare_model(sparse="sparse24") puts Sparse24Linear in every 2:4 linear; the engine then runs those modules
    and still matches generate on the unswapped 2:4 model. A dense model is left alone by "auto"."""
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import Sparse24Linear
    from sparsefast.serve.sparse import prepare_model

    dense_model, _ = _load(story_llama_dir)
    assert prepare_model(dense_model, "auto", "cpu") == []
    model, tok = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    expected = [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]
    swapped = prepare_model(model, "sparse24", "cpu")
    assert len(swapped) == 14 and isinstance(model.model.layers[1].mlp.up_proj, Sparse24Linear)
    assert served_alone(model, tok, PROMPTS[:2]) == expected
    with pytest.raises(ValueError, match="sparse must be one of"):
        prepare_model(model, "on")


def test_cpu_auto_swaps_only_to_sparse_linears_and_decodes_the_same(story_llama_dir):
    """CPU "auto": the measured swap (SparseLinear where its kernel wins on this machine) on a 2:4 model; whatever
    it chose, the engine's greedy tokens equal generate on the model before the swap."""
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import SparseLinear
    from sparsefast.serve.sparse import prepare_model

    model, tok = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    expected = [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]
    for name in prepare_model(model, "auto", "cpu"):
        assert isinstance(model.get_submodule(name), SparseLinear), name
    assert served_alone(model, tok, PROMPTS[:2]) == expected
