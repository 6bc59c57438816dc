"""Per-request isolation (sparsefast.serve.engine): sampling, detokenizing and the stop check run per request, so a
request that fails there ends alone with finish_reason "error" while every other request of its batch goes on with
exactly the tokens it would have produced alone. Checked in the engine and over HTTP (the failing request gets 500
with OpenAI's body when not streamed, an error event when streamed), with the failure forced by a fault injected into
sampling or detokenizing, and with the hostile parameters of issue 20 (temperature / top_p 1e-300), which must now
simply work."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

import sparsefast.serve.engine as engine_module
from sparsefast.models import load_model
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.detokenize import IncrementalDetokenizer
from sparsefast.serve.engine import GenerationEngine, SamplingParams
from tests.serve.server_helpers import PROMPTS, completion_ids, running_server

HONEST = PROMPTS[:7]
POISONED_PROMPT = PROMPTS[8]
MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
FAIL_AT = 5  # the injected fault fires on the poisoned request's 5th token: it has streamed 4 by then
POISON_SEED = 666  # marks the poisoned request for the sampling fault (greedy ignores the seed)
POISON_STOP = "<poison>"  # marks it for the detokenizer fault (the story llama never writes this)


class InjectedFault(RuntimeError):
    pass


def _fault_in_sampling(monkeypatch) -> SamplingParams:
    """sample_next raises on the FAIL_AT-th token of requests seeded POISON_SEED; returns their params."""
    real, calls = engine_module.sample_next, {}

    def sample_next(logits, params, generator):
        if params.seed == POISON_SEED:
            calls[id(params)] = calls.get(id(params), 0) + 1
            if calls[id(params)] == FAIL_AT:
                raise InjectedFault("sampling fault injected by the test")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, seed=POISON_SEED)


def _fault_in_detokenizing(monkeypatch) -> SamplingParams:
    """The detokenizer raises on the FAIL_AT-th token of requests with the stop string POISON_STOP."""
    real = IncrementalDetokenizer.add

    def add(self, token_id):
        if POISON_STOP in self.stop and len(self.ids) == FAIL_AT - 1:
            raise InjectedFault("detokenizer fault injected by the test")
        return real(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, stop=(POISON_STOP,))


FAULTS: dict[str, Callable] = {"sampling": _fault_in_sampling, "detokenizing": _fault_in_detokenizing}
# accepted parameters that made the sampler raise before issue 20; each now samples the greedy token
HOSTILE = {"temperature=1e-300": dict(temperature=1e-300), "temperature=5e-324": dict(temperature=5e-324),
           "top_p=1e-300": dict(temperature=1.0, top_p=1e-300, seed=7)}


@pytest.fixture(scope="module")
def story(story_llama_dir):
    return load_model(str(story_llama_dir))


@pytest.fixture(scope="module")
def alone(story) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, served alone."""
    model, tok = story
    engine = GenerationEngine(model, tok, max_batch=1, max_model_len=128)
    engine.start()
    try:
        return {p: engine.generate(completion_ids(tok, p), GREEDY) for p in HONEST + [POISONED_PROMPT]}
    finally:
        engine.shutdown()


def _batch_of_eight(model, tok, poisoned: SamplingParams) -> tuple[list[list[int]], list]:
    """The 7 honest greedy requests and the poisoned one, queued before the engine starts so that its first step
    admits all 8 into one batch; (honest token lists, the poisoned request's events)."""
    engine = GenerationEngine(model, tok, max_batch=8, max_model_len=128)
    try:
        honest = [engine.submit(completion_ids(tok, p), GREEDY) for p in HONEST[:3]]
        bad = engine.submit(completion_ids(tok, POISONED_PROMPT), poisoned)
        honest += [engine.submit(completion_ids(tok, p), GREEDY) for p in HONEST[3:]]
        engine.start()
        tokens = [[t for ev in s for t in ev.token_ids] for s in honest]
        return tokens, list(bad)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_fails_its_request_alone_in_the_engine(story, alone, monkeypatch, fault):
    model, tok = story
    tokens, events = _batch_of_eight(model, tok, FAULTS[fault](monkeypatch))
    assert tokens == [alone[p] for p in HONEST]
    assert events[-1].finish_reason == "error" and all(e.finish_reason is None for e in events[:-1])
    assert [t for e in events for t in e.token_ids] == alone[POISONED_PROMPT][:FAIL_AT - 1]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_sampling_parameters_no_longer_fail_the_batch(story, alone, hostile):
    model, tok = story
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **HOSTILE[hostile])
    tokens, events = _batch_of_eight(model, tok, params)
    assert tokens == [alone[p] for p in HONEST]
    assert events[-1].finish_reason == "length"
    assert [t for e in events for t in e.token_ids] == alone[POISONED_PROMPT]


# ---- over HTTP --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server8(story) -> Iterator[tuple[str, GenerationEngine]]:
    """A server whose engine decodes 8 requests together (no key, default limits)."""
    model, tok = story
    engine = GenerationEngine(model, tok, max_batch=8, max_queue=16, max_model_len=128)
    with running_server(create_app(lambda: (engine, tok), ServerConfig(model_name="story"))) as base:
        yield base, engine


def _stream_text(base: str, body: dict) -> tuple[list[str], dict | None]:
    """The texts of a streamed completion's chunks and its error object (None when it ended normally)."""
    texts, error = [], None
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                error = chunk["error"]
            else:
                texts.append(chunk["choices"][0]["text"])
    return texts, error


def _seven_honest_streams_and(base: str, poisoned: Callable[[], object]) -> tuple[list[str], object]:
    """Run 7 honest greedy streams and `poisoned()` concurrently; (the honest texts, what poisoned returned)."""
    answers: dict[int, str] = {}
    result: list[object] = []

    def honest(i: int) -> None:
        texts, error = _stream_text(base, {"model": "story", "prompt": HONEST[i], "max_tokens": MAX_TOKENS,
                                           "temperature": 0, "ignore_eos": True})
        answers[i] = "".join(texts) if error is None else f"error: {error}"

    threads = [threading.Thread(target=honest, args=(i,)) for i in range(7)]
    threads.append(threading.Thread(target=lambda: result.append(poisoned())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [answers.get(i, "no answer") for i in range(7)], result[0] if result else None


def _poisoned_body(params: SamplingParams) -> dict:
    body = {"model": "story", "prompt": POISONED_PROMPT, "max_tokens": MAX_TOKENS, "temperature": params.temperature,
            "ignore_eos": True}
    return body | ({"seed": params.seed} if params.seed is not None else {}) | (
        {"stop": list(params.stop)} if params.stop else {})


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("streamed", [False, True], ids=["non-streamed", "streamed"])
def test_a_fault_fails_its_request_alone_over_http(server8, story, alone, monkeypatch, fault, streamed):
    base, _ = server8
    tok = story[1]
    body = _poisoned_body(FAULTS[fault](monkeypatch))
    if streamed:
        answers, (texts, error) = _seven_honest_streams_and(base, lambda: _stream_text(base, body))
        assert error is not None and error["code"] == "engine_error" and error["type"] == "internal_server_error"
        assert "".join(texts) == tok.decode(alone[POISONED_PROMPT][:FAIL_AT - 1], skip_special_tokens=True)
    else:
        answers, response = _seven_honest_streams_and(
            base, lambda: httpx.post(base + "/v1/completions", json=body, timeout=120))
        assert response.status_code == 500 and response.json()["error"]["code"] == "engine_error"
    assert answers == [tok.decode(alone[p], skip_special_tokens=True) for p in HONEST]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_parameters_over_http_get_the_greedy_answer(server8, story, alone, hostile):
    base, tok = server8[0], story[1]
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    answers, out = _seven_honest_streams_and(base, lambda: client.completions.create(
        model="story", prompt=POISONED_PROMPT, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True},
        **HOSTILE[hostile]))
    assert answers == [tok.decode(alone[p], skip_special_tokens=True) for p in HONEST]
    assert out.choices[0].text == tok.decode(alone[POISONED_PROMPT], skip_special_tokens=True)
