"""OpenAI error bodies and the request guard (sparsefast.serve.errors) on the real server: malformed bodies are 400
with OpenAI's error fields (never a traceback), unknown routes 404, bodies over the limit 413 (declared length or
chunked)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.server_helpers import BODY_LIMIT, KEY, MODEL


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
