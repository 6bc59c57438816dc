"""`sparsefast serve` as a user runs it: bad settings are one-line errors before anything loads, and the command
serves the story llama over HTTP (a subprocess on a free 127.0.0.1 port, always terminated)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from sparsefast.cli import main
from tests.serve.server_helpers import CHAT_TEMPLATE, free_port


@pytest.mark.parametrize("argv,needle", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--admit-wait-ms", "-1"], "--admit-wait-ms must be in 0..1000"),
    (["--admit-wait-ms", "nan"], "--admit-wait-ms must be in 0..1000"),
    (["--admit-wait-ms", "inf"], "--admit-wait-ms must be in 0..1000"),
    (["--chat-template", "/nonexistent/template.jinja"], "no such file"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_bad_settings_are_one_line_errors(story_llama_dir, capsys, argv, needle):
    assert main(["serve", str(story_llama_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_model_fails_before_the_port_opens(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_serve_command_answers_on_its_port(story_llama_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparsefast", "serve", str(story_llama_dir), "--port", str(port),
                             "--served-model-name", "story", "--chat-template", str(template), "--max-batch", "2",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 120, None
        while status != 200:
            assert proc.poll() is None, f"server exited early: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "server not healthy within 120 s"
            try:
                status = httpx.get(base + "/health", timeout=2).status_code
                assert status in (200, 503)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["story"]
        out = client.chat.completions.create(model="story", messages=[{"role": "user", "content": "A cat"}],
                                             max_tokens=6, temperature=0)
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
