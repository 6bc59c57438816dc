"""The OpenAI-compatible HTTP server (FastAPI) in front of an `EngineClient` (a `GenerationEngine` in production).

`create_app` assembles it: the routes (sparsefast.serve.routes: /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics), OpenAI-style error handlers, the body-size and request-counting guard (sparsefast.serve.errors),
and a lifespan that loads the model in a background thread, so /health answers 503 while it loads and 200 once the
engine runs, and that shuts the engine down with the app.

Threading: the model loads in its own thread; the engine runs its step loop in its own thread; handlers run on the
event loop and never block it (sparsefast.serve.routes, sparsefast.serve.streaming).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from sparsefast.serve.engine_client import EngineClient
from sparsefast.serve.errors import RequestGuard, install_error_handlers
from sparsefast.serve.routes import openai_router, router
from sparsefast.serve.state import ServerConfig, ServerState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Loader", "ServerConfig", "create_app"]

logger = logging.getLogger("sparsefast.serve")

Loader = Callable[[], "tuple[EngineClient, PreTrainedTokenizerBase]"]  # () -> (engine not yet started, tokenizer)


def create_app(load: Loader, config: ServerConfig, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> RequestGuard:
    """The server as an ASGI app (the FastAPI app behind a `RequestGuard`).

    `load()` runs in a background thread at startup and returns (engine, tokenizer); the app starts the engine and
    shuts it down with the app. `on_load_error` lets the CLI stop the server when loading fails.
    """
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_load_into, args=(state, load, on_load_error), name="sparsefast-load",
                                  daemon=True)
        loader.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(loader.join)
            if state.engine is not None:
                await anyio.to_thread.run_sync(state.engine.shutdown)

    app = FastAPI(title="sparsefast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.include_router(router)
    app.include_router(openai_router)
    install_error_handlers(app)

    def count(path: str, status: int) -> None:
        if path.startswith("/v1/"):
            state.metrics.count_request(path, status)

    return RequestGuard(app, max_body_bytes=config.max_body_bytes, on_finished=count)


def _load_into(state: ServerState, load: Loader, on_load_error: Callable[[BaseException], None] | None) -> None:
    """The loader thread: load, start the engine, publish it on `state`; or record why loading failed."""
    try:
        engine, tokenizer = load()
        engine.start()
        state.tokenizer, state.engine = tokenizer, engine
    except BaseException as exc:  # noqa: BLE001 - reported through /health and on_load_error
        logger.exception("model loading failed")
        state.error = f"{type(exc).__name__}: {exc}"
        if on_load_error is not None:
            on_load_error(exc)
