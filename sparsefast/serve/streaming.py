"""From an engine's `TokenStream`s to an HTTP answer: the whole text and events of a non-streamed request
(`collect`), or server-sent events (`EventStream` over `completion_chunks` / `chat_chunks`). A request with n > 1 has
one stream per sample (its choice `index`); a streamed one interleaves their chunks.

SSE format (OpenAI's): one `data: {json}` line per chunk, each followed by a blank line, then `data: [DONE]`. A chunk
goes out for every event with text or a finish reason; chat streams open with a chunk whose delta holds the role;
`stream_options.include_usage` adds `"usage": null` to every chunk and a last chunk with empty choices and the usage.
A request the engine ends "error" (it failed this request alone: sparsefast.serve.engine) or "cancelled" gets an
error chunk ({"error": {...}}, the body and code a non-streamed request gets with its 500 / 503) instead of a finish,
then `[DONE]`.

Both paths watch for the client's `http.disconnect` while they wait for the engine, and cancel the request however
they end, so a client that goes away frees its batch slot at the next engine step. Both feed the metrics (time to
first token, time per output token, latency) for requests that end normally, and the token counts of every request
however it ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
from fastapi import Request
from fastapi.responses import Response

from sparsefast.serve import protocol as P
from sparsefast.serve.engine_client import TokenEvent, TokenStream
from sparsefast.serve.errors import APIError, error_body
from sparsefast.serve.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from sparsefast.serve.metrics import ServerMetrics

# (choice index, event, chunk) of one streamed request; index and event None for the chunks no event produced (the
# usage chunk)
Chunks = AsyncIterator[tuple[int | None, TokenEvent | None, dict[str, Any]]]


def samples_usage(lasts: list[TokenEvent], n: int = 1) -> P.Usage:
    """The usage block of a request from the last event of each choice, n choices per prompt in prompt order: each
    prompt's tokens counted once (its samples share one prefill), every choice's completion tokens."""
    prompt = sum(e.prompt_tokens for e in lasts[::n])
    completion = sum(e.completion_tokens for e in lasts)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _MetricsTracker:
    """Follows one request's events for the metrics (first-token time, last event). count_prompt False: a second
    sample of a prompt, whose prompt tokens the first sample counts."""

    def __init__(self, stream: TokenStream, metrics: ServerMetrics, count_prompt: bool = True) -> None:
        self.stream, self.metrics, self.count_prompt = stream, metrics, count_prompt
        self.first: float | None = None
        self.last: TokenEvent | None = None
        self.observed = False

    def see(self, event: TokenEvent) -> None:
        if self.first is None and event.token_ids:
            self.first = event.time
        self.last = event
        if event.finish_reason is not None and event.finish_reason not in ("cancelled", "error"):
            self.observed = True
            self.metrics.observe_request(submitted=self.stream.submitted, first_token=self.first,
                                         last_event=event.time, prompt_tokens=self._prompt_tokens(event),
                                         completion_tokens=event.completion_tokens)

    def _prompt_tokens(self, event: TokenEvent) -> int:
        return event.prompt_tokens if self.count_prompt else 0

    def close(self) -> None:
        """The request is over: a request that did not finish normally (client gone, cancelled, failed) still
        counts the tokens its last event reports."""
        if not self.observed and self.last is not None:
            self.observed = True
            self.metrics.count_tokens(self._prompt_tokens(self.last), self.last.completion_tokens)


def _abnormal_end(event: TokenEvent) -> APIError:
    """The error of a request the engine ended "error" (500 engine_error) or "cancelled" (503 cancelled)."""
    if event.finish_reason == "error":
        return APIError(500, "generation failed inside the engine for this request; see the server log",
                        code="engine_error")
    return APIError(503, "request cancelled: the server is shutting down", code="cancelled")


async def _until_disconnect(receive: Callable, scope: anyio.abc.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def collect(request: Request, stream: TokenStream, metrics: ServerMetrics,
                  count_prompt: bool = True) -> tuple[str, list[TokenEvent]]:
    """All of a non-streamed request's text and its events (the last one has the finish reason); a client disconnect
    cancels the request. count_prompt: as _MetricsTracker's.

    Raises APIError 500 when the engine failed the request, 503 when it was cancelled (shutdown) or the client left
    before any event."""
    tracker, events = _MetricsTracker(stream, metrics, count_prompt), []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_disconnect, request.receive, tg.cancel_scope)
            async for event in stream:
                tracker.see(event)
                events.append(event)
            tg.cancel_scope.cancel()
    finally:
        stream.cancel()  # idempotent; frees the slot when the client went away
        tracker.close()
    last = tracker.last
    if last is None:  # the client disconnected before any event: nobody reads this answer
        raise APIError(503, "client disconnected before the first token", code="cancelled")
    if last.finish_reason in ("error", "cancelled"):
        raise _abnormal_end(last)
    return "".join(e.text for e in events), events


def _sse(obj: Mapping[str, Any] | str) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _interleaved(streams: list[TokenStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(index, event) of every stream until each has ended, one event from each running stream in turn: the samples
    of one prompt decode in the same engine steps, so no sample waits more than a step for another's."""
    readers = [stream.__aiter__() for stream in streams]
    running = list(range(len(readers)))
    while running:
        for i in list(running):
            event = await readers[i].__anext__()
            yield i, event
            if event.finish_reason is not None:
                running.remove(i)


async def _event_chunks(streams: list[TokenStream], head: dict[str, Any], include_usage: bool,
                        choice: Callable[[int, TokenEvent], dict[str, Any]],
                        first: Callable[[int], dict[str, Any]] | None = None) -> Chunks:
    """For each choice `first(index)` (if given), then one chunk per event with text, logprobs or a finish reason
    (`choice(index, event)` builds its choice), then the usage chunk; an "error" or "cancelled" end of any choice
    yields an error chunk and nothing more."""
    extra = {"usage": None} if include_usage else {}
    if first is not None:
        for index in range(len(streams)):
            yield None, None, {**head, "choices": [first(index)], **extra}
    lasts: dict[int, TokenEvent] = {}
    async for index, event in _interleaved(streams):
        lasts[index] = event
        if event.finish_reason in ("cancelled", "error"):
            err = _abnormal_end(event)
            yield index, event, error_body(err.status, err.message, code=err.code, type=err.type)
            return
        if event.text or event.finish_reason is not None or event.logprobs:  # held-back text: its logprobs go now
            yield index, event, {**head, "choices": [choice(index, event)], **extra}
    if include_usage and lasts:
        usage = samples_usage([lasts[i] for i in sorted(lasts)], len(streams))
        yield None, None, {**head, "choices": [], "usage": usage.model_dump()}


def completion_chunks(streams: list[TokenStream], request_id: str, model: str, include_usage: bool,
                      logprob_texts: TokenTexts | None = None) -> Chunks:
    """The chunks of a streamed /v1/completions answer (`text_completion` objects, one stream per choice); with
    `logprob_texts` (the token texts after the prompt), each chunk's logprobs object holds its tokens' logprobs (text
    offsets counted over the choice's whole answer)."""
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
    offsets = [0] * len(streams)

    def choice(index: int, ev: TokenEvent) -> dict[str, Any]:
        logprobs = None
        if logprob_texts is not None:
            logprobs = completion_logprobs(ev.logprobs, logprob_texts, offsets[index])
            offsets[index] += sum(map(len, logprobs["tokens"]))
        return {"index": index, "text": ev.text, "logprobs": logprobs, "finish_reason": ev.finish_reason}

    return _event_chunks(streams, head, include_usage, choice)


def chat_chunks(streams: list[TokenStream], request_id: str, model: str, include_usage: bool,
                logprob_texts: TokenTexts | None = None) -> Chunks:
    """The chunks of a streamed /v1/chat/completions answer (`chat.completion.chunk` objects, one stream per choice,
    each choice's role chunk first); with `logprob_texts`, each chunk carries its tokens' logprobs in the chat
    shape."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return _event_chunks(streams, head, include_usage,
                         lambda index, ev: {"index": index, "delta": {"content": ev.text} if ev.text else {},
                                            "logprobs": None if logprob_texts is None else
                                            chat_logprobs(ev.logprobs, logprob_texts),
                                            "finish_reason": ev.finish_reason},
                         lambda index: {"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None})


class EventStream(Response):
    """A server-sent-event response that owns its engine requests (one stream per choice): it sends chunks as the
    engine produces them, watches for the client's disconnect at the same time, and cancels the requests however the
    response ends."""

    media_type = "text/event-stream"

    def __init__(self, streams: list[TokenStream], chunks: Chunks, metrics: ServerMetrics) -> None:
        # no super().__init__: it would add "content-length: 0" for the empty initial body
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.streams, self.chunks = streams, chunks
        self.trackers = [_MetricsTracker(stream, metrics, count_prompt=i == 0) for i, stream in enumerate(streams)]

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
            for stream, tracker in zip(self.streams, self.trackers):
                stream.cancel()
                tracker.close()

    async def _pump(self, send: Callable) -> None:
        async for index, event, chunk in self.chunks:
            if event is not None:
                self.trackers[index].see(event)
            await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": _sse("[DONE]"), "more_body": False})
