"""Helpers for the server tests: run an app under uvicorn on a free 127.0.0.1 port in a thread, always shut down."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

# the story llama's tokenizer has no chat template; this one is what the tests serve it with
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


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
