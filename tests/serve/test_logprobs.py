"""Logprobs (sparsefast.serve.logprobs) in the engine and through the server, on the tiny story llama: prompt
logprobs from the prefill equal the model's own log-softmax on the same tokens (fp32, within 1e-4), in both runners;
a greedy token's logprob is its position's top value exactly; max_tokens 0 scores without generating. Over HTTP with
the real openai client: completions `echo` + `logprobs` with several token-id prompts in one request, as lm-eval's
local-completions sends its loglikelihood batches, each choice's prompt scores equal to the model's; chat logprobs
with top_logprobs; streamed completions carry their tokens' logprobs; what stays unsupported is a 400."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from sparsefast.serve.engine import SamplingParams
from sparsefast.serve.logprobs import position_logprobs, prompt_logprobs
from tests.serve.server_helpers import MODEL, PROMPTS, completion_ids
from tests.serve.test_engine import running_engine

ATOL = 1e-4


def _model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own forward: [len(ids) - 1] logprobs of ids[1:]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_position_logprobs_rank_ties_by_id_and_match_log_softmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    out = position_logprobs(logits, [2, 3], 2)
    want = torch.log_softmax(logits, -1)
    assert [e.token for e in out] == [2, 3]
    assert out[0].logprob == pytest.approx(float(want[0, 2])) and out[1].logprob == pytest.approx(float(want[1, 3]))
    assert [t for t, _ in out[0].top] == [1, 2] and [t for t, _ in out[1].top] == [0, 1]
    assert position_logprobs(logits, [1, 0], 0)[0].top == ()
    first, *rest = prompt_logprobs(logits, [7, 2], 1)
    assert first.token == 7 and first.logprob is None and [e.token for e in rest] == [2]
    with pytest.raises(ValueError, match="2 rows of logits for 1 tokens"):
        position_logprobs(logits, [1], 1)


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_engine_prompt_logprobs_equal_the_models_own(story_llama_dir, runner):
    from sparsefast.api import load

    model, tok = load(story_llama_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    with running_engine(model, tok, max_batch=4, max_model_len=96, runner=runner) as engine:
        scored = [engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=3)) for ids in prompts]
        generated = engine.submit(prompts[1], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2,
                                                             prompt_logprobs=1, ignore_eos=True))
        events = [list(s) for s in scored]
        gen_events = list(generated)
    for ids, evs in zip(prompts, events):
        assert len(evs) == 1 and evs[0].finish_reason == "length" and evs[0].token_ids == ()
        entries = evs[0].prompt_logprobs
        assert [e.token for e in entries] == ids and entries[0].logprob is None
        got = torch.tensor([e.logprob for e in entries[1:]])
        torch.testing.assert_close(got, _model_logprobs(model, ids), atol=ATOL, rtol=0)
        assert all(len(e.top) == 3 and e.top[0][1] >= e.logprob - 1e-6 for e in entries[1:])
    # generation: the prompt's logprobs on the first event, one entry per greedy token, equal to its top value
    assert len(gen_events[0].prompt_logprobs) == len(prompts[1])
    assert all(ev.prompt_logprobs is None for ev in gen_events[1:])
    tokens = [t for ev in gen_events for t in ev.token_ids]
    entries = [e for ev in gen_events for e in ev.logprobs]
    assert [e.token for e in entries] == tokens and len(tokens) == 4
    assert all(e.top[0] == (e.token, e.logprob) for e in entries)
    full = _model_logprobs(model, prompts[1] + tokens)[len(prompts[1]) - 1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), full, atol=ATOL, rtol=0)


def test_scoring_requests_and_plain_requests_share_the_batch(story_llama_dir):
    """A plain request decoding while scoring requests come and go keeps its greedy output."""
    from sparsefast.api import load

    model, tok = load(story_llama_dir)
    ids = tok(PROMPTS[0])["input_ids"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with running_engine(model, tok, max_batch=3, max_model_len=96) as engine:
        alone = engine.generate(ids, greedy)
        plain = engine.submit(ids, greedy)
        scores = [engine.submit(tok(p)["input_ids"], SamplingParams(max_tokens=0, prompt_logprobs=0))
                  for p in PROMPTS[1:4]]
        assert [t for ev in plain for t in ev.token_ids] == alone
        assert all(list(s)[-1].finish_reason == "length" for s in scores)


def test_sampling_params_bounds():
    with pytest.raises(ValueError, match=r"logprobs: must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=21).validate()
    with pytest.raises(ValueError, match="max_tokens: must be an integer >= 1 \\(0 only to score a prompt"):
        SamplingParams(max_tokens=0).validate()
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).validate().max_tokens == 0


# ---- over HTTP --------------------------------------------------------------------------------------------------
def test_echo_logprobs_batch_scores_each_prompt_like_lm_eval(served, client):
    """lm-eval local-completions' loglikelihood request: token-id prompts in one request, echo, logprobs=1,
    max_tokens=1, temperature 0; it reads token_logprobs[ctxlen:-1] and compares each with max(top_logprobs)."""
    _, _, tokenizer, model = served
    prompts = [completion_ids(tokenizer, p) for p in PROMPTS[:3]]
    out = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, ids in zip(out.choices, prompts):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), _model_logprobs(model, ids),
                                   atol=ATOL, rtol=0)
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # the greedy token, exactly
        assert choice.text.startswith(tokenizer.decode(ids))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 3


def test_echo_with_max_tokens_zero_scores_a_string_prompt(served, client):
    _, _, tokenizer, model = served
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], echo=True, logprobs=0, max_tokens=0)
    choice, ids = out.choices[0], completion_ids(tokenizer, PROMPTS[2])
    assert choice.text == PROMPTS[2] and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert len(choice.logprobs.token_logprobs) == len(ids)
    assert all(top == {} for top in choice.logprobs.top_logprobs[1:])
    total = sum(choice.logprobs.token_logprobs[1:])
    assert math.isclose(total, float(_model_logprobs(model, ids).sum()), abs_tol=ATOL * len(ids))


def test_generated_logprobs_without_echo_and_in_a_stream(served, client):
    ids = completion_ids(served[2], PROMPTS[0])
    plain = client.completions.create(model=MODEL, prompt=ids, logprobs=3, max_tokens=6, temperature=0)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == 6 and all(v is not None and len(t) <= 3 for v, t in zip(lp.token_logprobs,
                                                                                    lp.top_logprobs))
    assert "".join(lp.tokens) == plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=ids, logprobs=3, max_tokens=6, temperature=0,
                                            stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_chat_logprobs_with_top_logprobs(served, client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == out.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == item.logprob
        assert bytes(item.bytes).decode() == item.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story"}],
                                                 max_tokens=5, temperature=0, logprobs=True, stream=True))
    streamed = [i.logprob for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt=["a", "b"], stream=True), "prompt"),
    (dict(echo=True, stream=True), "echo"),
])
def test_what_stays_unsupported_is_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**(dict(model=MODEL, prompt="Once upon a time", max_tokens=4) | kwargs))
    assert err.value.body["param"] == param and param in err.value.body["message"]
