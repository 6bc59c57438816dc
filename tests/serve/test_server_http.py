"""HTTP-layer behaviours of `sparsefast serve` that need a controllable engine: /health while loading and after a
failed load, a full queue (429), a client leaving mid-stream (its request is cancelled, others go on), engine errors
(500, never a traceback), a tokenizer without a chat template. The real-engine tests are in test_server_api.py."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import transformers

from sparsefast.serve.app import ServerConfig, create_app
from tests.serve.scripted_engine import ScriptedEngine
from tests.serve.server_helpers import running_server, wait_until

MODEL = "scripted"


@pytest.fixture(scope="module")
def tokenizer(story_llama_dir):
    return transformers.AutoTokenizer.from_pretrained(str(story_llama_dir))


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30, **kw)


def serve(engine: ScriptedEngine, tokenizer, **config):
    app = create_app(lambda: (engine, tokenizer), ServerConfig(model_name=MODEL, **config))
    return running_server(app)


def test_health_is_503_while_loading_then_200(tokenizer):
    release = threading.Event()
    engine = ScriptedEngine()

    def slow_load():
        assert release.wait(timeout=30), "test never released the loader"
        return engine, tokenizer

    app = create_app(slow_load, ServerConfig(model_name=MODEL))
    with running_server(app, wait_healthy=False) as base:
        try:
            r = httpx.get(base + "/health", timeout=5)
            assert r.status_code == 503 and r.json()["status"] == "loading"
            with pytest.raises(openai.APIStatusError) as err:
                client(base).completions.create(model=MODEL, prompt="Once", max_tokens=2)
            assert err.value.status_code == 503 and err.value.body["code"] == "model_not_ready"
        finally:
            release.set()
        wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 10, "/health 200 after load")
        out = client(base).completions.create(model=MODEL, prompt="Once", max_tokens=3)
        assert out.choices[0].text == "w0 w1 w2 " and out.usage.completion_tokens == 3


def test_failed_load_is_reported_on_health(tokenizer):
    seen: list[BaseException] = []

    def broken_load():
        raise FileNotFoundError("no weights in /nowhere")

    app = create_app(broken_load, ServerConfig(model_name=MODEL), on_load_error=seen.append)
    with running_server(app, wait_healthy=False) as base:
        wait_until(lambda: seen, 10, "on_load_error")
        r = httpx.get(base + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "error" and "/nowhere" in r.json()["error"]
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=5)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_full_queue_is_429_and_queued_requests_still_finish(tokenizer):
    engine = ScriptedEngine(max_batch=1, max_queue=2)
    engine.admit.clear()  # nothing starts running: requests pile up in the queue
    with serve(engine, tokenizer) as base:
        results: list[str] = []

        def queued_request():
            results.append(client(base).completions.create(model=MODEL, prompt="Once", max_tokens=2).choices[0].text)

        threads = [threading.Thread(target=queued_request) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: engine.queue_depth == 2, 10, "two queued requests")
            with pytest.raises(openai.RateLimitError) as err:
                client(base).completions.create(model=MODEL, prompt="Once", max_tokens=2)
            body = err.value.body
            assert body["code"] == "queue_full" and body["type"] == "rate_limit_error" and "retry" in body["message"]
            metrics = httpx.get(base + "/metrics", timeout=5).text
            assert "sparsefast:num_requests_waiting 2.0" in metrics
        finally:
            engine.admit.set()
            for t in threads:
                t.join(timeout=30)
        assert results == ["w0 w1 ", "w0 w1 "]


def test_client_leaving_mid_stream_cancels_only_its_request(tokenizer):
    engine = ScriptedEngine(max_batch=4, step_s=0.02)
    with serve(engine, tokenizer) as base:
        other: list[str] = []
        other_thread = threading.Thread(target=lambda: other.append(
            client(base).completions.create(model=MODEL, prompt="Once", max_tokens=30).choices[0].text))
        other_thread.start()
        lines = 0
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "Once", "max_tokens": 400, "stream": True}) as r:
            for line in r.iter_lines():
                lines += line.startswith("data: ")
                if lines == 3:
                    break  # leave: the connection closes with the block
        assert lines == 3
        wait_until(lambda: any(s.params.max_tokens == 400 for s in engine.finished), 10, "the abandoned request to end")
        abandoned = next(s for s in engine.finished if s.params.max_tokens == 400)
        assert abandoned.cancelled.is_set()
        other_thread.join(timeout=30)
        assert other == ["".join(f"w{i} " for i in range(30))]
        assert engine.running == 0 and engine.queue_depth == 0


def test_engine_error_is_500_with_openai_body_and_an_error_event_when_streaming(tokenizer):
    engine = ScriptedEngine(fail_after=2)
    with serve(engine, tokenizer) as base:
        with pytest.raises(openai.InternalServerError) as err:
            client(base).completions.create(model=MODEL, prompt="Once", max_tokens=5)
        assert err.value.body["code"] == "engine_error" and "Traceback" not in err.value.response.text
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "Once", "max_tokens": 5, "stream": True}) as r:
            payloads = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-2]]
        assert texts == ["w0 ", "w1 "]
        assert json.loads(payloads[-2])["error"]["code"] == "error"


def test_chat_without_a_template_is_400(tokenizer):
    assert tokenizer.chat_template is None  # the story llama ships none
    with serve(ScriptedEngine(), tokenizer) as base:
        with pytest.raises(openai.BadRequestError) as err:
            client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["code"] == "no_chat_template" and "--chat-template" in err.value.body["message"]
