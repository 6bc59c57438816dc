"""The contract between the HTTP layer and a generation engine (vLLM's `EngineClient` in spirit).

The app (`sparsefast.serve.app`, `routes`, `streaming`) uses an engine only through `EngineClient` and the streams
it returns only through `TokenStream`. `GenerationEngine` and its `RequestStream` (sparsefast.serve.engine) declare and
implement both, and so does the scripted test double in tests/serve/, which lets the HTTP tests pin down a full
queue, a slow stream or an engine error. The contract:

* `submit(prompt_ids, params)` queues one request and returns its stream at once (it never waits for generation);
  `submit_samples(prompt_ids, [params, ...])` queues several samples of one prompt (OpenAI's `n`), a stream each.
  It raises `ValueError("<field>: <problem>; <fix>")` for a bad prompt or bad parameters (the HTTP layer answers 400
  naming the field), `QueueFullError` when `max_queue` requests are already waiting (429), and `EngineClosedError`
  after `shutdown()` (503).
* A stream yields `TokenEvent`s in order; the last one, and only the last, has `finish_reason` set: "stop" (EOS or a
  stop string), "length" (max_tokens reached), "cancelled" (`cancel()` or `shutdown()`), "error" (the engine failed
  this request; the traceback is in the engine's log). The HTTP layer reads a stream once, by async iteration.
* `cancel()` is idempotent and may be called from any thread, also after the end: the engine frees the request's
  batch slot at its next step and ends the stream with "cancelled" unless it had already finished.
* `queue_depth` and `running` may be read at any time from any thread (the metrics read them at scrape time).
* `start()` starts generating in the background and is idempotent; `shutdown()` ends every unfinished stream with
  "cancelled" and stops. Both may block, so the app calls them from a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sparsefast.serve.logprobs import TokenLogprob

if TYPE_CHECKING:
    from sparsefast.serve.sampling import SamplingParams

__all__ = ["EngineClient", "EngineClosedError", "QueueFullError", "TokenEvent", "TokenStream"]


class QueueFullError(RuntimeError):
    """submit() found max_queue requests already waiting."""


class EngineClosedError(RuntimeError):
    """submit() after shutdown()."""


@dataclass(frozen=True)
class TokenEvent:
    """New output of one request since its previous event.

    text: the text that became final since the previous event. It may be "" while text is held back (it could still
        become a stop string, or ends inside a multi-byte character); the texts of all events joined are the answer.
    token_ids: the ids generated since the previous event (one per decode step; none on a "cancelled"/"error" end).
    finish_reason: None while the request runs; "stop" | "length" | "cancelled" | "error" on its last event.
    prompt_tokens, completion_tokens: the request's counts so far (completion_tokens includes an EOS that ended it).
    time: `time.perf_counter()` when the event was produced (the clock of `TokenStream.submitted`).
    logprobs: one TokenLogprob per id of token_ids when the request asked for logprobs, else ().
    prompt_logprobs: on the request's first event, when it asked for prompt logprobs: one entry per prompt token
        (the first one's logprob None); else None. A request with max_tokens 0 gets one event: these and finish
        "length".
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    time: float
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@runtime_checkable
class TokenStream(Protocol):
    """The events of one submitted request, as the HTTP layer reads them.

    submitted: `time.perf_counter()` at submit (the start of time to first token and of end-to-end latency).
    """

    submitted: float

    def cancel(self) -> None:
        """Idempotent, thread safe: the request leaves the batch at the next step and its stream ends "cancelled"."""
        ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """The events in order, ending with the one that has a finish_reason; awaits without blocking the loop."""
        ...


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP layer needs from a generation engine (the module docstring states the contract).

    max_model_len: prompt + generated tokens one request may hold.
    max_queue: waiting requests beyond which submit() raises QueueFullError.
    """

    max_model_len: int
    max_queue: int

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot now."""
        ...

    @property
    def running(self) -> int:
        """Requests in the current decode batch."""
        ...

    def start(self) -> None:
        """Start generating in the background (idempotent)."""
        ...

    def shutdown(self) -> None:
        """End every unfinished stream with "cancelled" and stop; blocks until the engine's thread has ended."""
        ...

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        """Queue one request; raises ValueError, QueueFullError or EngineClosedError (see the module docstring)."""
        ...

    def submit_samples(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[TokenStream]:
        """Queue len(params) samples of one prompt (OpenAI's n), one stream each, all or none; raises as submit."""
        ...
