"""OpenAI error bodies and the request guard (sparsefast.serve.errors) on the real server: malformed bodies are 400
with OpenAI's error fields (never a traceback), unknown routes 404, bodies over the limit 413 (declared length or
chunked). The request types (sparsefast.serve.protocol) are strict where OpenAI's are: wrong JSON types, non-finite
numbers, text that is not valid Unicode and unbounded stop lists are 400 naming the field."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from sparsefast.serve.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS
from tests.serve.scripted_engine import ScriptedEngine
from tests.serve.server_helpers import BODY_LIMIT, KEY, MODEL, SCRIPTED_MODEL, serve_scripted


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


def _post(base: str, path: str, content: bytes) -> httpx.Response:
    return httpx.post(base + path, content=content, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})


def _completion_body(extra: bytes) -> bytes:
    return b'{"model": "story-llama", "prompt": "Once", "max_tokens": 2, ' + extra + b"}"


@pytest.mark.parametrize("path, content, param", [
    ("/v1/completions", rb'{"model": "story-llama", "prompt": "Once \ud800 upon", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "story-llama", "prompt": "Once \xed\xa0\x80 upon", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"model": "story-llama", "prompt": ["\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", rb'{"model": "story-llama", "messages": [{"role": "user", "content": "hi \udbff"}]}',
     "messages"),
    ("/v1/chat/completions",
     rb'{"model": "story-llama", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
     "messages"),
], ids=["escaped", "raw-bytes", "prompt-list", "chat", "chat-part"])
def test_text_that_cannot_be_encoded_is_400_without_a_traceback(served, caplog, path, content, param):
    """A lone UTF-16 surrogate (escaped, or as the raw bytes ED A0 80, which Python's JSON reader turns into one) made
    the tokenizer raise TypeError: 500 and a traceback in the log (issue 20)."""
    r = _post(served[0], path, content)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"] and "valid Unicode" in error["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("extra, param, expected", [
    (b'"max_tokens": "16"', "max_tokens", "an integer"),
    (b'"max_tokens": true', "max_tokens", "an integer"),
    (b'"max_tokens": 16.0', "max_tokens", "an integer"),
    (b'"stream": "yes"', "stream", "a boolean"),
    (b'"ignore_eos": "yes"', "ignore_eos", "a boolean"),
    (b'"temperature": "0.5"', "temperature", "a number"),
    (b'"seed": "7"', "seed", "an integer"),
    (b'"prompt": [5, true]', "prompt", "an integer"),
    (b'"prompt": 5', "prompt", "a string or an array"),
    (b'"stop": 5', "stop", "a string or an array"),
])
def test_loosely_typed_values_are_400(served, extra, param, expected):
    """OpenAI's API rejects these; pydantic's lax mode converted them (issue 20)."""
    r = _post(served[0], "/v1/completions", _completion_body(extra))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_type", "invalid_request_error")
    assert error["message"].startswith(param) and f"expected {expected}" in error["message"]


def test_loosely_typed_chat_values_are_400(served):
    for extra, param in ((b'"max_completion_tokens": "5"', "max_completion_tokens"), (b'"stream": 1', "stream"),
                         (b'"messages": [{"role": "user", "content": 5}]', "messages")):
        r = _post(served[0], "/v1/chat/completions",
                  b'{"model": "story-llama", "messages": [{"role": "user", "content": "hi"}], ' + extra + b"}")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("extra, param", [(b'"temperature": NaN', "temperature"), (b'"top_p": Infinity', "top_p"),
                                          (b'"temperature": -Infinity', "temperature")])
def test_non_finite_numbers_are_refused_as_such(served, extra, param):
    r = _post(served[0], "/v1/completions", _completion_body(extra))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param
    assert error["message"].startswith(f"{param}: must be a finite number"), error["message"]


def test_stop_strings_are_bounded_like_openai(served):
    for stop, needle in ((["a", "b", "c", "d", "e"], f"at most {MAX_STOP_STRINGS}"),
                         (["x" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"),
                         (["ok", ""], "must not be empty")):
        r = httpx.post(served[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                       json={"model": "story-llama", "prompt": "Once", "max_tokens": 2, "stop": stop})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "stop" and needle in error["message"], r.text


def test_eighty_thousand_stop_strings_never_reach_the_engine(tokenizer):
    """80,000 stop strings (a body under 1 MiB) made a 32-token request take 8.5 s of the engine's one thread."""
    engine = ScriptedEngine()
    with serve_scripted(engine, tokenizer) as base:
        body = {"model": SCRIPTED_MODEL, "prompt": "Once", "max_tokens": 32, "stop": [f"s{i}" for i in range(80_000)]}
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        assert "got 80000" in r.json()["error"]["message"] and engine.count == 0


def test_unknown_paths_add_no_metric_series(served):
    """The request counter is labelled by route: a client sending requests to made-up /v1/ paths must not create a
    series (and memory) per path."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(5):
        assert httpx.get(served[0] + f"/v1/made-up-{i}", headers=headers).status_code == 404
    huge = httpx.post(served[0] + "/v1/made-up-big", content=b"x" * (BODY_LIMIT + 1), headers=headers)
    assert huge.status_code == 413
    metrics = httpx.get(served[0] + "/metrics").text
    assert "made-up" not in metrics
