"""The real server (uvicorn on a free 127.0.0.1 port, the real GenerationEngine, the tiny story llama) driven with the
real `openai` client: completions, chat, streaming, 16 concurrent clients, a client leaving mid-stream, every error
code, the body limit, /metrics through prometheus' text parser. One server for the module; always shut down."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sparsefast.models import load_model
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine, SamplingParams
from tests.serve.server_helpers import CHAT_TEMPLATE, running_server, wait_until

MODEL, KEY = "story-llama", "test-key"
MAX_MODEL_LEN, TOKENS_LIMIT, BODY_LIMIT = 256, 200, 8192
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird",
           "There was a girl named Sue", "The sun was hot", "Max had a red ball", "In a small town",
           "The cat sat on", "Mom said", "A boy found a box", "The tree was tall and", "Ben liked to",
           "It was a rainy day", "The frog jumped", "Anna saw a star"]


@pytest.fixture(scope="module")
def served(story_llama_dir):
    """(base URL, engine, tokenizer, model) of a running server; engine and server stop at the end of the module."""
    model, tokenizer = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tokenizer, max_batch=4, max_queue=32, max_model_len=MAX_MODEL_LEN)
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_tokens_limit=TOKENS_LIMIT, max_body_bytes=BODY_LIMIT,
                          chat_template=CHAT_TEMPLATE)
    with running_server(create_app(lambda: (engine, tokenizer), config)) as base:
        yield base, engine, tokenizer, model


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference_text(engine, tokenizer, ids: list[int], max_tokens: int) -> str:
    """What the engine produces for this prompt alone (greedy), detokenized the way the server's text is."""
    out = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return tokenizer.decode(out, skip_special_tokens=True)


def completion_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_matches_the_model_greedy(served, client):
    _, _, tok, model = served
    ids = completion_ids(tok, PROMPTS[0])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    with torch.no_grad():  # the engine is idle now: the same model object is free for the reference
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    ended_by_eos = tok.eos_token_id in ref
    ref = ref[:ref.index(tok.eos_token_id)] if ended_by_eos else ref
    assert out.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert out.choices[0].finish_reason == ("stop" if ended_by_eos else "length")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens in ((len(ref), len(ref) + 1) if ended_by_eos else (20,))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_token_id_prompt_equals_text_prompt(served, client):
    tok = served[2]
    ids = completion_ids(tok, PROMPTS[1])
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_uses_the_template_and_matches_the_engine(served, client):
    _, engine, tok, _ = served
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog and a cat"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, chat_template=CHAT_TEMPLATE)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference_text(engine, tok, list(ids), 16)
    assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_reassembles_to_the_non_streamed_text(client, endpoint):
    if endpoint == "completions":
        kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0)
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        full_text = whole.choices[0].text
    else:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=24, temperature=0)
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full_text = whole.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 2  # really streamed, not one blob
    assert text == full_text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sixteen_concurrent_clients_each_get_their_own_answer(served, client):
    _, engine, tok, _ = served
    refs = [reference_text(engine, tok, completion_ids(tok, p), 24) for p in PROMPTS]
    assert len(set(refs)) > 8  # the prompts really lead to different answers

    def ask(i: int) -> str:
        out = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=24, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16), timeout=120))
    assert answers == refs


def test_client_leaving_mid_stream_frees_its_slot_while_others_finish(served, client):
    base, engine, tok, _ = served
    refs = [reference_text(engine, tok, completion_ids(tok, p), 20) for p in PROMPTS[3:6]]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = client.completions.create(model=MODEL, prompt=PROMPTS[3 + i], max_tokens=20,
                                               temperature=0).choices[0].text

    body = {"model": MODEL, "prompt": PROMPTS[7], "max_tokens": TOKENS_LIMIT, "ignore_eos": True, "stream": True}
    got = 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for line in r.iter_lines():
            got += line.startswith("data: {")
            if got == 3:
                break  # hang up after three chunks of a 200-token request
    assert got == 3
    for t in threads:
        t.join(timeout=60)
    assert [answers[i] for i in range(3)] == refs
    wait_until(lambda: engine.running == 0 and engine.queue_depth == 0, 30, "the engine to be idle again")
    # the slot is free: a new request is served normally
    out = client.completions.create(model=MODEL, prompt=PROMPTS[8], max_tokens=8, temperature=0)
    assert out.choices[0].text == reference_text(engine, tok, completion_ids(tok, PROMPTS[8]), 8)


def test_stop_string_ends_the_answer_before_it(served, client):
    _, engine, tok, _ = served
    full = reference_text(engine, tok, completion_ids(tok, PROMPTS[0]), 30)
    stop = full.strip().split(" ")[2]  # a word from inside the greedy answer
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text and full.startswith(out.choices[0].text)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPTS[4], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_bad_or_missing_api_key_is_401(served):
    bad = openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "invalid_api_key"
    r = httpx.get(served[0] + "/v1/models")  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served[0] + "/health").status_code == 200  # /health needs no key


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=2.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=TOKENS_LIMIT + 1), "max_tokens"),
    (dict(n=2), "n"),
    (dict(logprobs=2), "logprobs"),
    (dict(prompt="word " * 400), "prompt"),
    (dict(prompt=[5, 10**6]), "prompt"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_parameters_are_400_naming_the_field(client, kwargs, param):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and param in body["message"]


def test_malformed_bodies_are_400_not_tracebacks(served):
    base, headers = served[0], {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for content in (b"{not json", b'{"model": "story-llama"}', b'{"model": "story-llama", "messages": []}'):
        path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
        r = httpx.post(base + path, content=content, headers=headers)
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "Traceback" not in r.text


def test_unknown_route_is_404_with_an_error_body(served):
    r = httpx.get(served[0] + "/v1/engines", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_body_over_the_limit_is_413(served, client):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt="x" * (BODY_LIMIT + 10), max_tokens=2)
    assert err.value.status_code == 413 and err.value.body["code"] == "body_too_large"

    def chunked():  # no content-length: the limit is enforced while reading
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b" " * 1000

    r = httpx.post(served[0] + "/v1/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_metrics_parse_and_count_what_was_served(served, client):
    base = served[0]

    def scrape() -> dict[str, dict]:
        text = httpx.get(base + "/metrics").text
        return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
                for f in text_string_to_metric_families(text)}

    before = scrape()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[9], max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 10
    after = scrape()

    def value(m, family, sample, **labels):
        return m.get(family, {}).get((sample, tuple(sorted(labels.items()))), 0.0)

    ok = dict(endpoint="/v1/completions", status="200")
    assert value(after, "sparsefast:requests", "sparsefast:requests_total", **ok) == \
        value(before, "sparsefast:requests", "sparsefast:requests_total", **ok) + 1
    gen = "sparsefast:generation_tokens"
    assert value(after, gen, gen + "_total") - value(before, gen, gen + "_total") == 10
    prompt = "sparsefast:prompt_tokens"
    assert value(after, prompt, prompt + "_total") - value(before, prompt, prompt + "_total") == \
        out.usage.prompt_tokens
    for hist in ("sparsefast:time_to_first_token_seconds", "sparsefast:time_per_output_token_seconds",
                 "sparsefast:e2e_request_latency_seconds"):
        assert value(after, hist, hist + "_count") == value(before, hist, hist + "_count") + 1
    assert value(after, "sparsefast:num_requests_running", "sparsefast:num_requests_running") == 0
    assert value(after, "sparsefast:num_requests_waiting", "sparsefast:num_requests_waiting") == 0
