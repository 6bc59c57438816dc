"""Penalties, logit_bias and min_tokens (sparsefast.serve.sampling.adjust_logits): the rule against a hand
computation, the parameter checks, and the real server with the real openai client against a greedy reference loop
over the model that applies OpenAI's formulas independently."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from sparsefast.serve.sampling import SamplingParams, adjust_logits
from tests.serve.server_helpers import MODEL, PROMPTS, completion_ids


def test_adjust_logits_matches_a_hand_computation():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, 4.0])
    prompt, output, eos = [1], [2, 2, 3], {5}
    params = SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.5,
                            logit_bias=((4, 2.0), (0, -1.0)), min_tokens=5).validate()
    expected = [1.0 - 1.0, 2.0 / 1.5, -1.0 * 1.5 - 2 * 0.3 - 0.5, 0.5 / 1.5 - 0.3 - 0.5, 3.0 + 2.0, -math.inf]
    got = adjust_logits(logits, params, prompt, output, eos)
    assert got.tolist() == pytest.approx(expected)
    assert logits.tolist() == [1.0, 2.0, -1.0, 0.5, 3.0, 4.0]  # the model's row is left as it was
    # min_tokens reached: EOS is back; no rule set: the logits as they are
    assert adjust_logits(logits, params, prompt, [2, 2, 3, 0, 0], eos)[5] == 4.0
    assert adjust_logits(logits, SamplingParams(), prompt, output, eos).tolist() == logits.tolist()


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                         ("repetition_penalty", 0.0), ("logit_bias", ((3, 101.0),)),
                                         ("logit_bias", ((-1, 1.0),)), ("min_tokens", 17)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=16, **{field: value}).validate()


def _reference(model, ids: list[int], n: int, presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids + out])).logits[0, -1].float()
            for token, b in bias.items():
                row[token] += b
            for token in set(out):
                row[token] -= out.count(token) * frequency + presence
            out.append(int(torch.argmax(row)))
    return out


def test_served_penalties_and_logit_bias_follow_openai_formulas(served, client):
    _, _, tok, model = served
    ids = completion_ids(tok, PROMPTS[1])
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, frequency_penalty=1.5,
                                    presence_penalty=0.5, logit_bias={"500": 3.0}, extra_body={"ignore_eos": True},
                                    logprobs=0)
    ref = _reference(model, ids, 24, 0.5, 1.5, {500: 3.0})
    assert out.choices[0].text == tok.decode(ref, skip_special_tokens=True) != plain.choices[0].text
    forced = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                       logit_bias={"500": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([500] * 5, skip_special_tokens=True)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logit_bias={"500": 100}, presence_penalty=0.1)
    assert chat.choices[0].message.content == tok.decode([500] * 4, skip_special_tokens=True)


def test_served_min_tokens_holds_back_eos(served, client):
    _, engine, tok, _ = served
    eos = sorted(engine.eos_ids)[0]
    ids = completion_ids(tok, PROMPTS[0])
    # EOS forced by the bias ends the request at once; min_tokens keeps it out for the first 6 tokens
    early = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                      logit_bias={str(eos): 100})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                     logit_bias={str(eos): 100}, extra_body={"min_tokens": 6})
    assert held.usage.completion_tokens == 7 and held.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{"logit_bias": {"abc": 1.0}}, {"logit_bias": {"99999999": 1.0}},
                                   {"logit_bias": {"5": 150}}, {"presence_penalty": 3}, {"n": 0},
                                   {"repetition_penalty": 0}, {"min_tokens": 99}])
def test_bad_sampling_fields_are_400_naming_the_field(client, extra):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Once", max_tokens=8, extra_body=extra)
    assert next(iter(extra)) in str(err.value)
