"""Streaming and request lifetime (sparsefast.serve.streaming): server-sent events that reassemble to the non-streamed
answer (real engine, real `openai` client), a client leaving mid-stream (its request is cancelled and frees its slot,
the others finish: real and scripted engine), and an engine error (500 with OpenAI's body, or an error event when
streaming, never a traceback: scripted engine)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.serve.scripted_engine import ScriptedEngine
from tests.serve.server_helpers import (
    KEY,
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


def test_client_leaving_mid_stream_cancels_only_its_request(tokenizer):
    engine = ScriptedEngine(max_batch=4, step_s=0.02)
    with serve_scripted(engine, tokenizer) as base:
        other: list[str] = []
        other_thread = threading.Thread(target=lambda: other.append(scripted_client(base).completions.create(
            model=SCRIPTED_MODEL, prompt="Once", max_tokens=30).choices[0].text))
        other_thread.start()
        lines = 0
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": SCRIPTED_MODEL, "prompt": "Once", "max_tokens": 400, "stream": True}) as r:
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
    with serve_scripted(engine, tokenizer) as base:
        with pytest.raises(openai.InternalServerError) as err:
            scripted_client(base).completions.create(model=SCRIPTED_MODEL, prompt="Once", max_tokens=5)
        assert err.value.body["code"] == "engine_error" and "Traceback" not in err.value.response.text
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": SCRIPTED_MODEL, "prompt": "Once", "max_tokens": 5, "stream": True}) as r:
            payloads = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-2]]
        assert texts == ["w0 ", "w1 "]
        assert json.loads(payloads[-2])["error"]["code"] == "engine_error"
