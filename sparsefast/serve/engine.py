"""GenerationEngine: iteration-level scheduling (Orca, Yu et al., OSDI 2022) over a static-slot KV cache.

One background thread runs steps. Each step: drop cancelled requests, admit waiting requests into free slots (up to
`max_batch`; prompts admitted together are prefilled in one padded forward and yield their first tokens), then one
batched decode forward for every running request. A request that finishes (EOS, stop string, max_tokens) or is
cancelled leaves at the step boundary and its slot is reused by the next waiting request. Waiting requests sit in a
bounded FIFO (`max_queue`). An idle engine that sees a request arrive waits while more keep arriving (each within
`admit_wait`, ADMIT_WAIT_S by default, of the last; at most 10x that), so a burst is prefilled in one forward:
otherwise the first arrival is prefilled and decodes alone, and the rest of the burst, prefilled in the next step,
stalls it for their whole prefill (8 clients of 128-token prompts on SmolLM2, 2-core CPU: stalls of 0.17-1.1 s; with
it, TPOT p90 at 8 concurrent 54.9 -> 46.6 ms through `serve`;
bench/results/2026-12-07-cpu-engine-burst-admission.txt, bench/results/2026-12-07-cpu-serve-admit-wait-4rounds.json).

Why our own scheduler rather than transformers' continuous batching (`generate_batch` / `init_continuous_batching`,
transformers 5.24, paged cache), measured on this project's CPU (2-core AMD EPYC, SmolLM2-135M fp32, 32-token random
prompts, 32 new tokens, same run; bench/results/2026-12-02-cpu-decode-smollm2-continuous-batching.json):
generate_batch made 2.3 tokens/s for one request and 20.2 for 8 (dense; 3.4 / 21.5 on the structural 20%
checkpoint), this engine 11.3 and 51.4 (15.4 / 62.3). Its paged cache is sized from `config.num_key_value_heads` for
every layer, so a structural checkpoint whose layers have different KV head counts fails in `index_copy_`
("Destination slice shape: 4 16 ... source slice shape: 2 16": the story llama with --gqa kv_groups), and one
GenerationConfig serves the whole manager: no per-request temperature/top_p/top_k/seed, no stop strings. Static
slots sized per layer (gpt-fast's static cache) handle every structural checkpoint.

The model runner (sparsefast.serve.runner) runs the model's own modules, so the one place a sparse linear plugs in
is the module swap before the engine is built (`sparsefast.nn.sparsify_`). With compile "on"/"auto" the decode step
is captured once per batch bucket at construction (sparsefast.serve.compiled: torch.compile with inductor, CUDA graphs
on CUDA, the sparse ops inside the graph, batches padded to 1, 2, 4, ... so serving never recompiles); prefill stays
eager. What that is worth, against the eager step and against llama.cpp and vLLM on the same weights, with and
without another process busy on a core: bench/results/*-cpu-decode-smollm2.json and *-cpu-decode-smollm2-busy.json
(`sparsefast bench decode`). What the profile of the compiled CPU step shows (torch.profiler, bf16 SmolLM2-135M,
2-core Xeon, ad-hoc): the linears are about two thirds of it, run by sparsefast's kernels (the dense GEMV of
sparsefast.ops.dense_cpu for dense layers and the head: torch's bf16 matmul read weights at half the rate), then
the fused glue (norms, rotary, residuals, the cache write) and the graph's own per-call overhead (~2.5-3 ms of a
10-14 ms bf16 step, about 8 calls per layer), then single-token attention: the decode-attention kernel of
sparsefast.ops.attention_cpu ~3% (11-12 us per layer, bench/results/2026-12-07-cpu-decode-step-profile.txt), where
SDPA over gathered cache rows cost 1.05-1.12x per token end to end
(bench/results/2026-12-07-cpu-decode-attention-ab.json); every region is an OpenMP parallel
region, so the engine must be built where its step is the process's only OpenMP user (`build_in_thread`), and must
not run a thread on a core another process keeps busy: each region would wait for that thread's turn on the core
(the benchmark's busy-core run: ~0.5 s per token with 2 threads on 2 cores, one busy; 42.6 ms with the 1 thread
that `--threads auto`, sparsefast.device.free_cpu_cores, chose).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from sparsefast.models import model_context
from sparsefast.serve.detokenize import IncrementalDetokenizer
from sparsefast.serve.engine_client import EngineClient, EngineClosedError, QueueFullError, TokenEvent, TokenStream
from sparsefast.serve.kv_cache import SlotAllocator
from sparsefast.serve.logprobs import TokenLogprob, position_logprobs, prompt_logprobs
from sparsefast.serve.runner import make_runner
from sparsefast.serve.sampling import SamplingParams, adjust_logits, make_generator, sample_next

__all__ = ["EngineClosedError", "GenerationEngine", "QueueFullError", "RequestStream", "SamplingParams", "TokenEvent",
           "build_in_thread"]

DEFAULT_MAX_MODEL_LEN = 2048  # cap when the model's context is longer: the cache is preallocated for every slot
PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward (bounds its activation memory)
ADMIT_WAIT_S = 0.005  # an idle engine waits this long for the next arrival of a burst (GenerationEngine._gather_burst)
log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestStream(TokenStream):
    """The events of one request (a `TokenStream`), readable from a thread (iteration) or an asyncio task (async
    iteration)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.submitted = time.perf_counter()
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = threading.Event()
        self._engine_wakeup = None  # set by the engine: wakes its loop so a cancel is seen promptly

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is closed; its reader is gone
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Idempotent. The engine frees the slot at its next step and ends the stream with "cancelled"."""
        self._cancel.set()
        if self._engine_wakeup is not None:
            self._engine_wakeup()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, flag))
        try:
            while True:
                flag.clear()  # before draining: a push after the drain sets it again
                with self._cond:
                    batch = list(self._events)
                    self._events.clear()
                for event in batch:
                    yield event
                    if event.finish_reason is not None:
                        return
                if not batch:
                    await flag.wait()
        finally:
            with self._cond:
                self._waiters.remove((loop, flag))


class _Request:
    """Engine-side state of one running request."""

    def __init__(self, stream: RequestStream, prompt: list[int], params: SamplingParams, tokenizer,
                 device: torch.device) -> None:
        self.stream, self.prompt, self.params = stream, prompt, params
        self.generator = make_generator(params, device)
        self.detok = IncrementalDetokenizer(tokenizer, params.stop)
        self.output: list[int] = []
        self.slot = -1
        self.done = False
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # sent with the first event
        self.matcher = params.grammar.matcher() if params.grammar is not None else None  # structured output

    @property
    def position(self) -> int:
        """Cache position of the newest token (which is fed in the next decode step)."""
        return len(self.prompt) + len(self.output) - 1


class GenerationEngine(EngineClient):
    """Batched generation with iteration-level scheduling; an `EngineClient` (sparsefast.serve.engine_client states
    the contract the HTTP layer relies on).

    Args:
        model: a causal LM as `sparsefast.models.load_model` returns it (dense, mask-pruned, structural with per-layer
            widths, possibly with sparse linears swapped in), in eval mode on `device`.
        tokenizer: its tokenizer (detokenization, stop strings, EOS id).
        max_batch: requests decoded together (KV slots). max_queue: waiting requests before submit raises.
        max_model_len: prompt + generated tokens per request (KV positions per slot); default min(context, 2048).
        runner: "auto" (batched for the LLaMA layout, per-request HF forward otherwise) | "batched" | "hf".
        compile: "off" (default: the eager step) | "on" | "auto": the batched runner's decode step compiled at
            construction, one graph per batch bucket (sparsefast.serve.compiled; "auto" falls back to eager where
            that cannot run). `compile_seconds` {bucket: s} says what the compile cost ({} when eager).

    On a CPU, load the model and construct the engine on a thread that exits before decoding (`build_in_thread`),
    not on a thread that stays alive and idle, such as a script's main thread: the engine's step then runs about 2x
    slower (OpenMP's wait policy; build_in_thread says why).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, device: str = "cpu", runner: str = "auto",
                 compile: str = "off", admit_wait: float = ADMIT_WAIT_S) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(admit_wait, bool) or not isinstance(admit_wait, (int, float)) or not 0 <= admit_wait <= 1:
            raise ValueError(f"admit_wait must be a number of seconds in [0, 1], got {admit_wait!r}")
        context = model_context(model)
        if max_model_len is None:
            max_model_len = min(context or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        if context is not None and max_model_len > context:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {context} tokens; "
                             f"pass max_model_len <= {context}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = torch.device(device)
        self.max_batch, self.max_queue, self.max_model_len = max_batch, max_queue, max_model_len
        self.admit_wait = float(admit_wait)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_ids = _eos_ids(model, tokenizer)
        self.runner = make_runner(model, max_batch, max_model_len, self.device, runner, compile)
        self.compile_seconds: dict[int, float] = dict(getattr(self.runner, "compile_seconds", {}))
        self._slots = SlotAllocator(max_batch)
        # each entry: the samples of one prompt (n of them), admitted together and prefilled once
        self._waiting: collections.deque[list[_Request]] = collections.deque()
        self._running: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # ---- public API --------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return sum(map(len, list(self._waiting)))

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        """Start the step loop in a background thread (idempotent)."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine was shut down; create a new GenerationEngine")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sparsefast-engine", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Cancel every waiting and running request (their streams end with "cancelled"), join the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:
            self._finish_all("cancelled")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue one request. Raises ValueError (bad prompt/params), QueueFullError, EngineClosedError."""
        return self.submit_samples(prompt_ids, [params])[0]

    def submit_samples(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[RequestStream]:
        """Queue len(params) samples of one prompt (OpenAI's `n`), one stream each: they are admitted together,
        the prompt is prefilled once and its keys and values copied to the other samples' slots. Raises as
        `submit`, and ValueError when there are more samples than batch slots."""
        if not params:
            raise ValueError("n: at least one sample is needed")
        if len(params) > self.max_batch:
            raise ValueError(f"n: {len(params)} samples exceed this server's batch of {self.max_batch} (they decode "
                             f"together); ask for n <= {self.max_batch}")
        params = [p.validate() for p in params]
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty; pass at least one token id")
        bad = [i for i in prompt if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        for p in params:
            bad = [t for t, _ in p.logit_bias if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            if len(prompt) + p.max_tokens > self.max_model_len:
                raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {p.max_tokens} exceeds "
                                 f"max_model_len {self.max_model_len}; shorten the prompt or lower max_tokens")
        group = []
        for p in params:
            stream = RequestStream(f"req-{next(self._ids)}")
            stream._engine_wakeup = self._wakeup
            group.append(_Request(stream, prompt, p, self.tokenizer, self.device))
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine was shut down; create a new GenerationEngine")
            waiting = self.queue_depth
            if waiting + len(group) > self.max_queue:
                raise QueueFullError(f"{waiting} requests are already waiting (max_queue {self.max_queue}); "
                                     "retry later")
            self._waiting.append(group)
            self._cond.notify_all()
        return [req.stream for req in group]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Submit and block until done; the generated token ids (EOS included when it ended the request)."""
        if self._thread is None:
            raise RuntimeError("the engine is not running; call start() first")
        out: list[int] = []
        for event in self.submit(prompt_ids, params):
            out.extend(event.token_ids)
            if event.finish_reason == "error":
                raise RuntimeError(f"generation failed for request {event}")
        return out

    # ---- the step loop -----------------------------------------------------------------------------------------
    def _wakeup(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                    if not self._running:
                        self._gather_burst()
                        if self._closed:  # shut down while gathering: the waiting requests end "cancelled"
                            break
                    # cancelled requests leave the queue without a slot
                    dropped = [r for group in self._waiting for r in group if r.stream.cancelled]
                    if dropped:
                        groups = ([r for r in g if not r.stream.cancelled] for g in self._waiting)
                        self._waiting = collections.deque(g for g in groups if g)
                    admitted: list[list[_Request]] = []  # whole groups: the samples of a prompt start together
                    free = self.max_batch - len(self._running)
                    while self._waiting and len(self._waiting[0]) <= free:
                        free -= len(self._waiting[0])
                        admitted.append(self._waiting.popleft())
                for req in dropped:
                    self._finish(req, "cancelled")
                try:
                    self._step(admitted)
                except Exception:  # a failed forward must not kill the server: fail this batch, keep serving
                    log.exception("generation step failed")
                    for req in dict.fromkeys([r for g in admitted for r in g] + self._running):
                        self._finish(req, "error")
        self._finish_all("cancelled")

    def _gather_burst(self) -> None:
        """With no request decoding and one waiting (called holding `_cond`): wait while more keep arriving, each
        within `admit_wait` of the last (at most 10 x admit_wait in all, or until the batch is full), so that a burst
        of requests is prefilled in one forward. Without it the first arrival is prefilled and starts decoding alone,
        and the rest of the burst, prefilled in the next step, stalls it for their whole prefill. Returns early on
        shutdown or when a cancel wakes it; requests queued behind a finished batch wait at most the same."""
        deadline = time.monotonic() + 10 * self.admit_wait
        seen = self.queue_depth
        while not self._closed and seen < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(self.admit_wait, left))
            depth = self.queue_depth
            if depth <= seen:  # nothing arrived within admit_wait: the burst is over
                return
            seen = depth

    def _step(self, admitted: list[list[_Request]]) -> None:
        for req in [r for r in self._running if r.stream.cancelled]:
            self._finish(req, "cancelled")
        samples: dict[_Request, list[_Request]] = {}  # the first live sample of each prompt -> all its samples
        for group in admitted:
            live = []
            for req in group:
                if req.stream.cancelled:
                    self._finish(req, "cancelled")
                    continue
                req.slot = self._slots.acquire()
                self._running.append(req)
                live.append(req)
            if live:
                samples[live[0]] = live
        decoding = len(self._running) - sum(map(len, samples.values()))
        for group in _prefill_groups(list(samples)):
            scoring = group[0].params.prompt_logprobs is not None  # such a request is prefilled alone
            log.debug("prefill of %d prompts (%d tokens) while %d requests wait to decode", len(group),
                      sum(len(r.prompt) for r in group), decoding)
            logits = self.runner.prefill([r.slot for r in group], [r.prompt for r in group], all_positions=scoring)
            for leader, row in zip(group, logits):
                self._start_samples(samples[leader], row, scoring)
        # the requests admitted above already produced this step's token
        fresh = {r for group in admitted for r in group}
        batch = [r for r in self._running if r not in fresh]
        if not batch:
            return
        batch.sort(key=lambda r: r.slot)  # contiguous slots → the attention reads cache views
        logits = self.runner.decode([r.slot for r in batch], [r.output[-1] for r in batch],
                                    [r.position for r in batch])
        for req, row in zip(batch, logits):
            self._advance(req, row)

    def _start_samples(self, group: list[_Request], logits: torch.Tensor, scoring: bool) -> None:
        """After the prefill of group[0]'s slot: copy its keys and values to the other samples' slots, then give
        every sample its first token from the prompt's logits (`logits` [vocab], or [len(prompt), vocab] when
        `scoring`: the prompt logprobs are computed once and sent to every sample)."""
        leader = group[0]
        for req in group[1:]:
            self.runner.copy_slot(leader.slot, req.slot, len(leader.prompt))
        if scoring:
            self._score_prompt(leader, logits)
            for req in group[1:]:
                if leader.done:  # scoring failed: every sample of the prompt ends with "error"
                    self._finish(req, "error")
                req.prompt_logprobs = leader.prompt_logprobs
            last = logits[-1]
        else:
            last = logits
        for req in group:
            if req.done:
                continue
            if req.params.max_tokens == 0:
                self._end_scored(req)
            else:
                self._advance(req, last)

    def _advance(self, req: _Request, logits: torch.Tensor) -> None:
        """Sample `req`'s next token from its logits row [vocab], detokenize it and check the stop conditions.

        The order: the logit adjustments (penalties, bias, min_tokens), then the grammar's mask (structured output:
        only the tokens it allows), then greedy or sampled choice, which the grammar then consumes.

        This is the per-request part of a step: an exception here (a sampling fault, a tokenizer that cannot decode,
        a grammar that allows nothing, ...) fails `req` alone, with an "error" event, and the other requests of the
        batch go on; a failed forward is the only thing that fails a whole batch (`_loop`)."""
        try:
            scores = adjust_logits(logits, req.params, req.prompt, req.output, self.eos_ids)
            if req.matcher is not None:
                scores = req.matcher.mask(scores)
            token = sample_next(scores, req.params, req.generator)
            if req.matcher is not None:
                req.matcher.accept(token)
            k = req.params.logprobs
            self._accept(req, token, () if k is None else tuple(position_logprobs(logits[None], [token], k)))
        except Exception:
            log.exception("request %s failed while sampling or detokenizing; the rest of its batch goes on",
                          req.stream.request_id)
            self._finish(req, "error")

    def _score_prompt(self, req: _Request, logits: torch.Tensor) -> None:
        """The prompt logprobs of `req` from its prefill logits [len(prompt), vocab]; a failure fails `req` alone."""
        try:
            req.prompt_logprobs = prompt_logprobs(logits, req.prompt, req.params.prompt_logprobs)
        except Exception:
            log.exception("request %s failed while scoring its prompt", req.stream.request_id)
            self._finish(req, "error")

    def _end_scored(self, req: _Request) -> None:
        """End a max_tokens 0 request after its prefill: one event with its prompt logprobs, finish "length"."""
        req.done = True
        req.stream._push(TokenEvent("", (), "length", len(req.prompt), 0, time.perf_counter(),
                                    prompt_logprobs=req.prompt_logprobs))
        self._release(req)

    def _accept(self, req: _Request, token: int, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        # everything that may raise (detokenizing, the stop check) runs before the request is marked done, so a
        # failure leaves it unfinished and `_advance` can still end its stream with "error"
        text = req.detok.add(token)
        req.output.append(token)
        reason = None
        if req.detok.stopped or (token in self.eos_ids and not req.params.ignore_eos):
            reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            reason = "length"
        if reason is not None:
            text += req.detok.flush()
            req.done = True
        req.stream._push(TokenEvent(text, (token,), reason, len(req.prompt), len(req.output), time.perf_counter(),
                                    logprobs, req.prompt_logprobs))
        req.prompt_logprobs = None  # sent with the first event only
        if reason is not None:
            self._release(req)

    def _release(self, req: _Request) -> None:
        if req in self._running:
            self._running.remove(req)
        if req.slot >= 0:
            self.runner.release(req.slot)
            self._slots.release(req.slot)
            req.slot = -1

    def _finish(self, req: _Request, reason: str) -> None:
        if req.done:
            self._release(req)
            return
        req.done = True
        req.stream._push(TokenEvent("", (), reason, len(req.prompt), len(req.output), time.perf_counter()))
        self._release(req)

    def _finish_all(self, reason: str) -> None:
        with self._cond:
            pending = [r for group in self._waiting for r in group] + list(self._running)
            self._waiting.clear()
        for req in pending:
            self._finish(req, reason)


def build_in_thread(build: Callable[[], T]) -> T:
    """Run `build` (load a model, swap its linears, construct the engine) on a thread of its own that has exited when
    this returns; its result, or its exception re-raised.

    Why: torch's CPU ops run on OpenMP (libgomp). Every thread that runs a parallel region keeps a pool of OpenMP
    workers until it exits, and once a process's pools hold more threads than there are cores, libgomp stops
    spin-waiting between regions, so each region of the engine's step pays a worker wake-up. Loading on the main
    thread and decoding on the engine's thread is exactly that case. Measured side by side (2-core Xeon,
    SmolLM2-135M fp32, eager engine, batch 1, 64 tokens): built on the main thread 52 ms per token, built here 28 ms,
    the runner looping on the main thread alone 28 ms. `sparsefast serve` loads on its loader thread, which exits;
    `sparsefast generate` and the decode benchmark build through this."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = build()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="sparsefast-build")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _prefill_groups(requests: list[_Request]) -> list[list[_Request]]:
    """Consecutive groups whose padded size (rows x longest prompt) stays within PREFILL_TOKENS: prompts admitted
    together are prefilled in one forward (the weights are read once), a long prompt runs alone. A request that
    asks for prompt logprobs is prefilled alone (its forward keeps the logits of every position: len x vocab)."""
    groups: list[list[_Request]] = []
    for req in requests:
        g = groups[-1] if groups else None
        if (g is not None and req.params.prompt_logprobs is None and g[0].params.prompt_logprobs is None
                and (len(g) + 1) * max(len(req.prompt), *(len(r.prompt) for r in g)) <= PREFILL_TOKENS):
            g.append(req)
        else:
            groups.append([req])
    return groups


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (may be a list, e.g. Llama-3) and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
