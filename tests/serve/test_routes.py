"""The endpoints (sparsefast.serve.routes) over HTTP. Against the real server (uvicorn on a free 127.0.0.1 port, the
real GenerationEngine, the tiny story llama) driven with the real `openai` client: models, models.retrieve and HEAD
/health, completions matching the model's greedy output, token-id prompts, chat through the template, 16 concurrent
clients, stop strings, seeded sampling, the API key, unknown models, invalid parameters. Against a scripted engine:
a full queue (429) and a tokenizer without a chat template."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.serve.scripted_engine import ScriptedEngine
from tests.serve.server_helpers import (
    CHAT_TEMPLATE,
    MODEL,
    PROMPTS,
    SCRIPTED_MODEL,
    TOKENS_LIMIT,
    completion_ids,
    reference_text,
    scripted_client,
    serve_scripted,
    wait_until,
)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_models_retrieve_and_head_health(served, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"
    head = httpx.head(served[0] + "/health")
    assert head.status_code == 200 and head.content == b""


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
    (dict(n=0), "n"),
    (dict(n=129), "n"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt="word " * 400), "prompt"),
    (dict(prompt=[5, 10**6]), "prompt"),
    (dict(stop=[""]), "stop"),
    (dict(prompt=[[5, 6], []]), "prompt"),
    (dict(extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}),
     "response_format"),
    (dict(extra_body={"response_format": {"type": "yaml"}}), "response_format"),
    (dict(extra_body={"response_format": {"type": "json_schema"}}), "response_format"),
    (dict(extra_body={"response_format": {"type": "json_object"}, "ignore_eos": True}), "ignore_eos"),
])
def test_invalid_parameters_are_400_naming_the_field(client, kwargs, param):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and param in body["message"]


def test_a_batch_of_one_token_prompt_is_that_prompt(served, client):
    ids = completion_ids(served[2], PROMPTS[1])
    one = client.completions.create(model=MODEL, prompt=[ids], max_tokens=6, temperature=0)
    assert one.choices[0].text == client.completions.create(model=MODEL, prompt=ids, max_tokens=6,
                                                             temperature=0).choices[0].text


@pytest.mark.parametrize("kwargs,param", [
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
])
def test_chat_options_not_served_are_400_not_ignored(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       **kwargs)
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_full_queue_is_429_and_queued_requests_still_finish(tokenizer):
    engine = ScriptedEngine(max_batch=1, max_queue=2)
    engine.admit.clear()  # nothing starts running: requests pile up in the queue
    with serve_scripted(engine, tokenizer) as base:
        results: list[str] = []

        def queued_request():
            out = scripted_client(base).completions.create(model=SCRIPTED_MODEL, prompt="Once", max_tokens=2)
            results.append(out.choices[0].text)

        threads = [threading.Thread(target=queued_request) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: engine.queue_depth == 2, 10, "two queued requests")
            with pytest.raises(openai.RateLimitError) as err:
                scripted_client(base).completions.create(model=SCRIPTED_MODEL, prompt="Once", max_tokens=2)
            body = err.value.body
            assert body["code"] == "queue_full" and body["type"] == "rate_limit_error" and "retry" in body["message"]
            metrics = httpx.get(base + "/metrics", timeout=5).text
            assert "sparsefast:num_requests_waiting 2.0" in metrics
        finally:
            engine.admit.set()
            for t in threads:
                t.join(timeout=30)
        assert results == ["w0 w1 ", "w0 w1 "]


def test_chat_without_a_template_is_400(tokenizer):
    assert tokenizer.chat_template is None  # the story llama ships none
    with serve_scripted(ScriptedEngine(), tokenizer) as base:
        with pytest.raises(openai.BadRequestError) as err:
            scripted_client(base).chat.completions.create(model=SCRIPTED_MODEL,
                                                          messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["code"] == "no_chat_template" and "--chat-template" in err.value.body["message"]


def test_cors_only_for_the_allowed_origins(tokenizer):
    """--allowed-origins: the preflight and the response carry the origin for an allowed one, nothing for another;
    without the option no CORS headers at all."""
    origin = "http://localhost:3000"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with serve_scripted(ScriptedEngine(), tokenizer, allowed_origins=(origin,)) as base:
        pre = httpx.options(base + "/v1/completions", headers=preflight)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
        assert "POST" in pre.headers["access-control-allow-methods"]
        got = httpx.get(base + "/v1/models", headers={"Origin": origin})
        assert got.status_code == 200 and got.headers["access-control-allow-origin"] == origin
        other = httpx.get(base + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with serve_scripted(ScriptedEngine(), tokenizer) as base:
        got = httpx.get(base + "/v1/models", headers={"Origin": origin})
        assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


def test_allowed_origins_flag_is_checked():
    from sparsefast.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--allowed-origins", "http://localhost:3000, https://app.example/"])
    assert args.allowed_origins == ("http://localhost:3000", "https://app.example")
    assert parser.parse_args(["serve", "m", "--allowed-origins", "*"]).allowed_origins == ("*",)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--allowed-origins", "localhost:3000/app"])
