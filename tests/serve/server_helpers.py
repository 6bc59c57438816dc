"""Helpers for the server tests: run an app under uvicorn on a free 127.0.0.1 port in a thread (always shut down),
the settings of the real-engine server (the `served` fixture in conftest.py) and of the scripted-engine servers, and
what the tests compare the server's answers with."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import uvicorn

from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine, SamplingParams
from sparsefast.serve.engine_client import EngineClient

# the story llama's tokenizer has no chat template; this one is what the tests serve it with
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")

# the real-engine server: the story llama under this name, key and limits
MODEL, KEY = "story-llama", "test-key"
MAX_MODEL_LEN, TOKENS_LIMIT, BODY_LIMIT = 256, 200, 8192
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird",
           "There was a girl named Sue", "The sun was hot", "Max had a red ball", "In a small town",
           "The cat sat on", "Mom said", "A boy found a box", "The tree was tall and", "Ben liked to",
           "It was a rainy day", "The frog jumped", "Anna saw a star"]
SCRIPTED_MODEL = "scripted"  # the name the scripted-engine servers serve


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app: Any, *, wait_healthy: bool = True, timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1:<free port> in a background thread; yields the base URL ("http://127.0.0.1:N").

    Waits until the port answers (and /health is 200 when `wait_healthy`), bounded by `timeout`; the server is
    stopped and its thread joined however the block ends.
    """
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if not thread.is_alive():
                raise RuntimeError("the test server exited during startup")
            try:
                status = httpx.get(base + "/health", timeout=2.0).status_code
                if status == 200 or not wait_healthy:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {base} not healthy within {timeout} s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=10)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll `predicate()` every 10 ms until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def reference_text(engine: GenerationEngine, tokenizer: Any, ids: list[int], max_tokens: int) -> str:
    """What the engine produces for this prompt alone (greedy), detokenized the way the server's text is."""
    out = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return tokenizer.decode(out, skip_special_tokens=True)


def record_prefills(engine: GenerationEngine) -> list[list[int]]:
    """The slots of each prefill forward `engine` runs from now on (its runner's prefill wrapped)."""
    prefills: list[list[int]] = []
    prefill = engine.runner.prefill

    def recording_prefill(slots, prompts, **kw):
        prefills.append(list(slots))
        return prefill(slots, prompts, **kw)

    engine.runner.prefill = recording_prefill
    return prefills


def completion_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def serve_scripted(engine: EngineClient, tokenizer: Any, **config: Any) -> contextlib.AbstractContextManager[str]:
    """A server over a scripted engine (tests.serve.scripted_engine) under SCRIPTED_MODEL; yields its base URL."""
    app = create_app(lambda: (engine, tokenizer), ServerConfig(model_name=SCRIPTED_MODEL, **config))
    return running_server(app)


def scripted_client(base: str, **kw: Any) -> openai.OpenAI:
    """An openai client for a scripted-engine server (no key, no retries)."""
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30, **kw)
