"""The OpenAI-compatible HTTP server (FastAPI) in front of a `GenerationEngine`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, or
`--chat-template`), `stream: true` as server-sent events (`data: {json}` chunks, then `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with usage), GET /health (503 until the model is loaded, then 200),
GET /metrics (Prometheus text).

Threading: the model loads in a background thread while /health already answers; the engine runs its step loop in its
own thread. Handlers never block the event loop: tokenization and chat templating run in a worker thread, and the
engine's streams are consumed with `async for`. A client that disconnects (mid-stream or while waiting for a
non-streamed answer) cancels its request, which frees its batch slot at the next engine step.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sparsefast.serve import protocol as P
from sparsefast.serve.errors import APIError, RequestGuard, error_body, install_error_handlers
from sparsefast.serve.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("sparsefast.serve")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP layer (the engine has its own: max_batch, max_queue, max_model_len).

    model_name: the id served at /v1/models and required in each request's `model` field.
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`.
    max_tokens_limit: upper bound on a request's max_tokens (None: only the context bounds it).
    max_body_bytes: request bodies larger than this get 413.
    chat_template: a Jinja chat template overriding the tokenizer's (needed for tokenizers without one).
    """
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = 1 << 20
    chat_template: str | None = None


class ServerState:
    """The engine and tokenizer once loaded, or the load error. Written once by the loader thread."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.tokenizer: Any = None
        self.error: str | None = None
        self.ready = threading.Event()

    def require_engine(self) -> Any:
        if self.engine is None:
            why = f"model failed to load: {self.error}" if self.error else "model is still loading; retry shortly"
            raise APIError(503, why, code="model_not_ready")
        return self.engine


Loader = Callable[[], tuple[Any, Any]]  # () -> (engine not yet started, tokenizer)


def create_app(load: Loader, config: ServerConfig, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app. `load()` runs in a background thread at startup and returns (engine, tokenizer); the app
    starts the engine and shuts it down with the app. `on_load_error` lets the CLI stop the server when loading fails.
    """
    state = ServerState()
    metrics = ServerMetrics(lambda: state.engine.queue_depth if state.engine is not None else 0,
                            lambda: state.engine.running if state.engine is not None else 0)

    def load_in_background() -> None:
        try:
            engine, tokenizer = load()
            engine.model_name = config.model_name
            engine.start()
            state.tokenizer, state.engine = tokenizer, engine
        except BaseException as exc:  # noqa: BLE001 - reported through /health and on_load_error
            logger.exception("model loading failed")
            state.error = f"{type(exc).__name__}: {exc}"
            if on_load_error is not None:
                on_load_error(exc)
        finally:
            state.ready.set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_in_background, name="sparsefast-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(loader.join)
            if state.engine is not None:
                await anyio.to_thread.run_sync(state.engine.shutdown)

    app = FastAPI(title="sparsefast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.metrics = metrics
    install_error_handlers(app)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.error else "loading"
        return JSONResponse({"status": status, **({"error": state.error} if state.error else {})}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> P.ModelList:
        engine = state.require_engine()
        return P.ModelList(data=[P.ModelCard(id=config.model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        engine = state.require_engine()
        if isinstance(body.prompt, str):
            prompt_ids = await anyio.to_thread.run_sync(_encode_text, state.tokenizer, body.prompt)
        else:
            prompt_ids = _check_ids(body.prompt, state.tokenizer)
        stream = _submit(engine, config, prompt_ids, body, body.max_tokens, "prompt")
        rid, model = P.new_id("cmpl"), config.model_name
        if body.stream:
            return EventStream(stream, _completion_chunks(stream, rid, model, body.include_usage()), metrics)
        text, last = await _collect(request, stream, metrics)
        return JSONResponse(P.CompletionResponse(
            id=rid, model=model, choices=[P.CompletionChoice(text=text, finish_reason=last.finish_reason)],
            usage=_usage(last)).model_dump())

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        engine = state.require_engine()
        prompt_ids = await anyio.to_thread.run_sync(_encode_chat, state.tokenizer, body.messages,
                                                    config.chat_template)
        stream = _submit(engine, config, prompt_ids, body, body.requested_max_tokens(), "messages")
        rid, model = P.new_id("chatcmpl"), config.model_name
        if body.stream:
            return EventStream(stream, _chat_chunks(stream, rid, model, body.include_usage()), metrics)
        text, last = await _collect(request, stream, metrics)
        return JSONResponse(P.ChatCompletionResponse(
            id=rid, model=model, usage=_usage(last),
            choices=[P.ChatChoice(message=P.ResponseMessage(content=text), finish_reason=last.finish_reason)],
        ).model_dump())

    def count(path: str, status: int) -> None:
        if path.startswith("/v1/"):
            metrics.count_request(path, status)

    return RequestGuard(app, max_body_bytes=config.max_body_bytes, on_finished=count)  # type: ignore[return-value]


# ----- prompt preparation ------------------------------------------------------------------------------------------

def _encode_text(tokenizer: Any, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise APIError(400, "prompt: tokenizes to no tokens; send a non-empty prompt", param="prompt")
    return ids


def _check_ids(ids: list[int], tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab}); send valid ids",
                       param="prompt", code="invalid_value")
    return list(ids)


def _encode_chat(tokenizer: Any, messages: list[P.ChatMessage], template: str | None) -> list[int]:
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions or start "
                            "the server with --chat-template FILE", param="messages", code="no_chat_template")
    try:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc
    out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        chat_template=template)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def _submit(engine: Any, config: ServerConfig, prompt_ids: list[int], body: P._SamplingFields,
            max_tokens: int | None, prompt_field: str) -> Any:
    """Build SamplingParams (the server's limits applied) and submit; maps engine errors to HTTP errors."""
    from sparsefast.serve.engine import EngineClosedError, QueueFullError, SamplingParams

    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"{prompt_field}: {len(prompt_ids)} prompt tokens leave no room in the "
                            f"{engine.max_model_len}-token context; shorten the prompt", param=prompt_field,
                       code="context_length_exceeded")
    limit = config.max_tokens_limit
    if max_tokens is None:  # OpenAI: generate up to the end of the context
        max_tokens = room if limit is None else min(room, limit)
    elif limit is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {limit}; ask for fewer",
                       param="max_tokens", code="invalid_value")
    try:
        stops = body.stop_strings()
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop=stops, ignore_eos=body.ignore_eos).validate()
        return engine.submit(prompt_ids, params)
    except QueueFullError as exc:
        raise APIError(429, f"server busy: {engine.max_queue} requests already queued ({exc}); retry later",
                       code="queue_full") from exc
    except EngineClosedError as exc:
        raise APIError(503, f"server is shutting down ({exc})", code="engine_closed") from exc
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc


# ----- responses ---------------------------------------------------------------------------------------------------

def _usage(ev: Any) -> P.Usage:
    return P.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                   total_tokens=ev.prompt_tokens + ev.completion_tokens)


class _Tracker:
    """Follows one request's events for the metrics (first-token time, last event)."""

    def __init__(self, stream: Any, metrics: ServerMetrics) -> None:
        self.stream, self.metrics = stream, metrics
        self.first: float | None = None
        self.last: Any = None

    def see(self, ev: Any) -> None:
        if self.first is None and ev.token_ids:
            self.first = ev.time
        self.last = ev
        if ev.finish_reason is not None and ev.finish_reason not in ("cancelled", "error"):
            self.metrics.observe_request(submitted=self.stream.submitted, first_token=self.first, last_event=ev.time,
                                         prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)


def _raise_for_abnormal_end(ev: Any) -> None:
    if ev.finish_reason == "error":
        raise APIError(500, "generation failed inside the engine; see the server log", code="engine_error")
    if ev.finish_reason == "cancelled":
        raise APIError(503, "request cancelled: the server is shutting down", code="cancelled")


async def _until_disconnect(receive: Callable, scope: anyio.abc.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _collect(request: Request, stream: Any, metrics: ServerMetrics) -> tuple[str, Any]:
    """All of a non-streamed request's text and its last event; a client disconnect cancels the request."""
    tracker, parts = _Tracker(stream, metrics), []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_disconnect, request.receive, tg.cancel_scope)
            async for ev in stream:
                tracker.see(ev)
                parts.append(ev.text)
            tg.cancel_scope.cancel()
    finally:
        stream.cancel()  # idempotent; frees the slot when the client went away
    if tracker.last is None:  # the client disconnected before any event: nobody reads this answer
        raise APIError(503, "client disconnected before the first token", code="cancelled")
    _raise_for_abnormal_end(tracker.last)
    return "".join(parts), tracker.last


def _sse(obj: Mapping[str, Any] | str) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _event_chunks(stream: Any, head: dict, include_usage: bool, choice: Callable[[Any], dict],
                        first: dict | None = None) -> AsyncIterator[Any]:
    """(event, chunk) pairs of one streamed request: `first` (if any), one chunk per event with text or a finish
    reason (`choice(event)` builds its choice), then the usage chunk. An abnormal end yields (event, None): the
    response sends an error event instead of a chunk."""
    extra = {"usage": None} if include_usage else {}
    if first is not None:
        yield None, {**head, "choices": [first], **extra}
    last = None
    async for ev in stream:
        last = ev
        if ev.finish_reason in ("cancelled", "error"):
            yield ev, None
            return
        if ev.text or ev.finish_reason is not None:
            yield ev, {**head, "choices": [choice(ev)], **extra}
    if include_usage and last is not None:
        yield None, {**head, "choices": [], "usage": _usage(last).model_dump()}


def _completion_chunks(stream: Any, rid: str, model: str, include_usage: bool) -> AsyncIterator[Any]:
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    return _event_chunks(stream, head, include_usage, lambda ev: {"index": 0, "text": ev.text, "logprobs": None,
                                                                   "finish_reason": ev.finish_reason})


def _chat_chunks(stream: Any, rid: str, model: str, include_usage: bool) -> AsyncIterator[Any]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _event_chunks(stream, head, include_usage,
                         lambda ev: {"index": 0, "delta": {"content": ev.text} if ev.text else {}, "logprobs": None,
                                     "finish_reason": ev.finish_reason}, first)


class EventStream(Response):
    """A server-sent-event response that owns its engine request: it sends chunks as the engine produces them,
    watches for the client's disconnect at the same time, and cancels the request however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, stream: Any, chunks: AsyncIterator[Any], metrics: ServerMetrics) -> None:
        # no super().__init__: it would add "content-length: 0" for the empty initial body
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.stream, self.chunks = stream, chunks
        self.tracker = _Tracker(stream, metrics)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_disconnect, receive, tg.cancel_scope)
                await self._pump(send)
                tg.cancel_scope.cancel()
        except OSError:  # the client went away while we were sending
            pass
        finally:
            self.stream.cancel()

    async def _pump(self, send: Callable) -> None:
        async for ev, chunk in self.chunks:
            if ev is not None:
                self.tracker.see(ev)
            if chunk is None:
                code = 500 if ev.finish_reason == "error" else 503
                chunk = error_body(code, f"generation ended abnormally ({ev.finish_reason})", code=ev.finish_reason)
            await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": _sse("[DONE]"), "more_body": False})
