"""n > 1 (several samples of one prompt): the engine prefills the prompt once and copies its keys and values to the
other samples' slots, so each sample must decode exactly what the same request run alone decodes (greedy and seeded,
both runners); the server returns n choices in OpenAI's order with the prompt counted once, streamed or not, through
the real openai client."""

from __future__ import annotations

import json

import httpx
import pytest

from sparsefast.serve.engine import GenerationEngine, SamplingParams
from tests.serve.server_helpers import KEY, MODEL, PROMPTS, completion_ids, record_prefills

SEEDED = [SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True) for seed in (7, 8, 9)]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _tokens(stream) -> list[int]:
    return [t for event in stream for t in event.token_ids]


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_samples_share_one_prefill_and_decode_as_requests_alone(story_llama_dir, runner):
    from sparsefast.api import load

    model, tok = load(story_llama_dir)
    engine = GenerationEngine(model, tok, max_batch=4, max_model_len=96, runner=runner)
    prefills = record_prefills(engine)
    ids = completion_ids(tok, PROMPTS[2])
    engine.start()
    try:
        seeded = [_tokens(s) for s in engine.submit_samples(ids, SEEDED)]
        assert prefills == [[0]]  # one prefill, of the first sample's slot, for all three
        greedy = [_tokens(s) for s in engine.submit_samples(ids, [GREEDY] * 3)]
        alone = [engine.generate(ids, p) for p in SEEDED]
        greedy_alone = engine.generate(ids, GREEDY)
    finally:
        engine.shutdown()
    assert seeded == alone
    assert len({tuple(t) for t in seeded}) == 3  # three seeds, three different samples
    assert greedy == [greedy_alone] * 3


def test_more_samples_than_slots_is_a_value_error_naming_n(story_llama_dir):
    from sparsefast.api import load

    model, tok = load(story_llama_dir)
    engine = GenerationEngine(model, tok, max_batch=2, max_model_len=64)
    with pytest.raises(ValueError, match=r"^n: 3 samples exceed"):
        engine.submit_samples([1, 2, 3], [GREEDY] * 3)


def test_completions_n_with_seed_and_several_prompts(served, client):
    _, _, tok, _ = served
    prompts = [completion_ids(tok, PROMPTS[0]), completion_ids(tok, PROMPTS[5])]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=10, temperature=1.0, seed=11,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for choice in out.choices:  # choice i*n + j: prompt i, seed 11 + j
        alone = client.completions.create(model=MODEL, prompt=prompts[choice.index // 2], max_tokens=10,
                                          temperature=1.0, seed=11 + choice.index % 2, extra_body={"ignore_eos": True})
        assert choice.text == alone.choices[0].text
    assert out.choices[0].text != out.choices[1].text
    assert out.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])  # each prompt once
    assert out.usage.completion_tokens == 40


def test_chat_n_streamed_equals_not_streamed(served, client):
    messages = [{"role": "user", "content": "Tell me about a cat."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=12, temperature=0.9,
                                           seed=5)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts, roles, finishes, usage = ["", "", ""], [0, 0, 0], [None] * 3, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=12, temperature=0.9,
                                                seed=5, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles[c.index] += c.delta.role == "assistant"
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert roles == [1, 1, 1] and finishes == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage


def test_streamed_completion_n_carries_each_choice_index(served):
    base = served[0]
    body = {"model": MODEL, "prompt": PROMPTS[3], "n": 2, "max_tokens": 8, "temperature": 0, "stream": True,
            "ignore_eos": True}
    texts = {0: "", 1: ""}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        for c in json.loads(line)["choices"]:
            texts[c["index"]] += c["text"]
    assert texts[0] == texts[1] != ""  # greedy: both samples are the greedy answer
