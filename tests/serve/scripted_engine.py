"""A scripted stand-in for GenerationEngine, for HTTP-layer behaviours the real engine makes hard to pin down in a
test (a queue that is full right now, a stream slow enough to disconnect from, an engine error). It declares and
implements the engine contract (sparsefast.serve.engine_client): `ScriptedEngine` is an `EngineClient`, its streams
are `TokenStream`s (tests/serve/test_engine_client.py checks both against the protocols).

Request k of a prompt emits tokens "w0 w1 ..." (one per `step_s`), each token id = last prompt id + i."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator

from sparsefast.serve.engine_client import EngineClient, EngineClosedError, QueueFullError, TokenEvent, TokenStream
from sparsefast.serve.sampling import SamplingParams


class ScriptedStream(TokenStream):
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.submitted = time.perf_counter()
        self.events: queue.Queue[TokenEvent] = queue.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.002)
                continue
            yield ev
            if ev.finish_reason is not None:
                return


class ScriptedEngine(EngineClient):
    """Runs up to `max_batch` scripted requests at a time in one thread; `hold` (set by default) pauses admission
    so tests can fill the queue; `fail_after` makes every request end with finish_reason "error" after that many
    tokens."""

    def __init__(self, *, max_batch: int = 2, max_queue: int = 2, max_model_len: int = 512, step_s: float = 0.01,
                 fail_after: int | None = None) -> None:
        self.max_batch, self.max_queue, self.max_model_len = max_batch, max_queue, max_model_len
        self.step_s, self.fail_after = step_s, fail_after
        self.admit = threading.Event()
        self.admit.set()
        self.waiting: list[ScriptedStream] = []
        self.active: list[ScriptedStream] = []
        self.finished: list[ScriptedStream] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.count = 0

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        self.closed.set()
        self.admit.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> ScriptedStream:
        if self.closed.is_set():
            raise EngineClosedError("engine is shut down")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt {len(prompt_ids)} + max_tokens {params.max_tokens} > "
                             f"max_model_len {self.max_model_len}")
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} waiting")
            self.count += 1
            stream = ScriptedStream(f"req-{self.count}", prompt_ids, params)
            self.waiting.append(stream)
        return stream

    def submit_samples(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[ScriptedStream]:
        streams: list[ScriptedStream] = []
        try:
            for p in params:
                streams.append(self.submit(prompt_ids, p))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def _loop(self) -> None:
        produced: dict[str, int] = {}
        while not self.closed.is_set():
            with self.lock:
                while self.admit.is_set() and self.waiting and len(self.active) < self.max_batch:
                    self.active.append(self.waiting.pop(0))
                active = list(self.active)
            for s in active:
                n = produced.get(s.request_id, 0)
                finish = None
                if s.cancelled.is_set():
                    finish = "cancelled"
                elif self.fail_after is not None and n >= self.fail_after:
                    finish = "error"
                if finish is None:
                    n += 1
                    produced[s.request_id] = n
                    finish = "length" if n >= s.params.max_tokens else None
                    ev = TokenEvent(text=f"w{n - 1} ", token_ids=(s.prompt_ids[-1] + n - 1,), finish_reason=finish,
                                    prompt_tokens=len(s.prompt_ids), completion_tokens=n, time=time.perf_counter())
                else:
                    ev = TokenEvent(text="", token_ids=(), finish_reason=finish, prompt_tokens=len(s.prompt_ids),
                                    completion_tokens=n, time=time.perf_counter())
                s.events.put(ev)
                if finish is not None:
                    with self.lock:
                        self.active.remove(s)
                        self.finished.append(s)
                    s.done.set()
            time.sleep(self.step_s)
        with self.lock:  # shut down: every request still queued or running ends "cancelled"
            leftover, self.waiting, self.active = self.waiting + self.active, [], []
        for s in leftover:
            s.events.put(TokenEvent(text="", token_ids=(), finish_reason="cancelled", prompt_tokens=len(s.prompt_ids),
                                    completion_tokens=produced.get(s.request_id, 0), time=time.perf_counter()))
