"""The app's assembly (sparsefast.serve.app): the model loads in the background while /health answers 503 and /v1/*
answer 503 "model_not_ready", then 200 once the engine runs; a failed load is reported on /health and through
on_load_error (scripted engine)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from sparsefast.serve.app import ServerConfig, create_app
from tests.serve.scripted_engine import ScriptedEngine
from tests.serve.server_helpers import SCRIPTED_MODEL, running_server, scripted_client, wait_until


def test_health_is_503_while_loading_then_200(tokenizer):
    release = threading.Event()
    engine = ScriptedEngine()

    def slow_load():
        assert release.wait(timeout=30), "test never released the loader"
        return engine, tokenizer

    app = create_app(slow_load, ServerConfig(model_name=SCRIPTED_MODEL))
    with running_server(app, wait_healthy=False) as base:
        try:
            r = httpx.get(base + "/health", timeout=5)
            assert r.status_code == 503 and r.json()["status"] == "loading"
            with pytest.raises(openai.APIStatusError) as err:
                scripted_client(base).completions.create(model=SCRIPTED_MODEL, prompt="Once", max_tokens=2)
            assert err.value.status_code == 503 and err.value.body["code"] == "model_not_ready"
        finally:
            release.set()
        wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 10, "/health 200 after load")
        out = scripted_client(base).completions.create(model=SCRIPTED_MODEL, prompt="Once", max_tokens=3)
        assert out.choices[0].text == "w0 w1 w2 " and out.usage.completion_tokens == 3


def test_failed_load_is_reported_on_health(tokenizer):
    seen: list[BaseException] = []

    def broken_load():
        raise FileNotFoundError("no weights in /nowhere")

    app = create_app(broken_load, ServerConfig(model_name=SCRIPTED_MODEL), on_load_error=seen.append)
    with running_server(app, wait_healthy=False) as base:
        wait_until(lambda: seen, 10, "on_load_error")
        r = httpx.get(base + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "error" and "/nowhere" in r.json()["error"]
        r = httpx.post(base + "/v1/completions", json={"model": SCRIPTED_MODEL, "prompt": "x"}, timeout=5)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
