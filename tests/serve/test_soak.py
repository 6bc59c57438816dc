"""Soak test of issue 20 (marked slow; about 90 s): 8 honest clients stream greedy completions for SOAK_SECONDS while
a ninth sends a randomized mix of hostile bodies to the same server (the real engine over the story llama, 127.0.0.1,
bounded loops, always shut down). Every honest answer must equal its greedy reference and none may fail; every hostile
body must get the answer its kind calls for (a 4xx naming the problem, or a normal answer for the hostile but valid
ones), never a 500; nothing may be logged at ERROR (no traceback); the process's RSS (server and clients share it)
may grow by less than 5% from after a warm-up (every hostile kind once, then WARMUP_SECONDS of the same traffic) to
the end. Run with -s to see the numbers."""

from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from sparsefast.models import load_model
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine
from tests.serve.server_helpers import CHAT_TEMPLATE, PROMPTS, completion_ids, reference_text, running_server

pytestmark = pytest.mark.slow

SOAK_SECONDS = 60.0
WARMUP_SECONDS = 10.0  # of the same traffic before the first RSS reading: the allocator's pools fill up in it
HONEST_CLIENTS = 8
MAX_TOKENS = 32
RSS_GROWTH_LIMIT = 0.05
URL = "/v1/completions"


def _raw(body: bytes, path: str = URL, content_type: str = "application/json") -> tuple[str, bytes, str]:
    return path, body, content_type


def _json(obj: dict, path: str = URL) -> tuple[str, bytes, str]:
    return path, json.dumps(obj).encode(), "application/json"


def _completion(**extra) -> dict:
    return {"model": "story", "prompt": "Once upon a time", "max_tokens": 8, **extra}


def _chat(content) -> dict:
    return {"model": "story", "messages": [{"role": "user", "content": content}], "max_tokens": 8}


# kind -> (the request, the statuses it may get); a few are valid requests with hostile values, answered normally
HOSTILE: dict[str, tuple[Callable[[random.Random], tuple[str, bytes, str]], set[int]]] = {
    "temperature 1e-300": (lambda r: _json(_completion(temperature=1e-300)), {200}),
    "temperature 5e-324": (lambda r: _json(_completion(temperature=5e-324, stream=True)), {200}),
    "top_p 1e-300": (lambda r: _json(_completion(top_p=1e-300, seed=r.randrange(100))), {200}),
    "temperature 2 top_k 1": (lambda r: _json(_completion(temperature=2, top_k=1, stream=True)), {200}),
    "temperature NaN": (lambda r: _raw(b'{"model": "story", "prompt": "a", "temperature": NaN}'), {400}),
    "top_p Infinity": (lambda r: _raw(b'{"model": "story", "prompt": "a", "top_p": Infinity}'), {400}),
    "escaped surrogate": (lambda r: _raw(rb'{"model": "story", "prompt": "a\ud800b"}'), {400}),
    "raw surrogate bytes": (lambda r: _raw(b'{"model": "story", "prompt": "a\xed\xa0\x80b"}'), {400}),
    "chat surrogate": (lambda r: _raw(rb'{"model": "story", "messages": [{"role": "user", "content": "\udc00"}]}',
                                      "/v1/chat/completions"), {400}),
    "invalid utf-8": (lambda r: _raw(b'{"model": "story", "prompt": "a\xff\xfeb"}'), {400}),
    "80000 stop strings": (lambda r: _json(_completion(stop=[f"s{i}" for i in range(80_000)])), {400}),
    "5 stop strings": (lambda r: _json(_completion(stop=list("abcde"))), {400}),
    "long stop string": (lambda r: _json(_completion(stop=["x" * 10_000])), {400}),
    "max_tokens string": (lambda r: _json(_completion(max_tokens="16")), {400}),
    "max_tokens true": (lambda r: _json(_completion(max_tokens=True)), {400}),
    "stream yes": (lambda r: _json(_completion(stream="yes")), {400}),
    "ignore_eos yes": (lambda r: _json(_completion(ignore_eos="yes")), {400}),
    "token id true": (lambda r: _json(_completion(prompt=[5, True])), {400}),
    "token id out of vocab": (lambda r: _json(_completion(prompt=[5, r.choice([-1, 10**9])])), {400}),
    "huge max_tokens": (lambda r: _json(_completion(max_tokens=10**12)), {400}),
    "huge seed": (lambda r: _json(_completion(seed=2**70, temperature=1)), {400}),
    "too long prompt": (lambda r: _json(_completion(prompt=[5] * 5000)), {400}),
    "many messages": (lambda r: _json({"model": "story", "messages": [{"role": "user", "content": "hi"}] * 2000}),
                      {400}),
    "n 0 or too many": (lambda r: _json(_completion(n=r.choice([0, 129]))), {400}),
    "content part not text": (lambda r: _json(_chat([{"type": "image_url", "image_url": {"url": "x"}}]),
                                              "/v1/chat/completions"), {400}),
    "invalid json": (lambda r: _raw(b'{"model": "story", "prompt": '), {400}),
    "deep nesting": (lambda r: _raw(b"[" * 200_000 + b"]" * 200_000), {400}),
    "not an object": (lambda r: _raw(r.choice([b"[]", b"null", b"5", b'"x"'])), {400}),
    "random bytes": (lambda r: _raw(r.randbytes(r.randint(1, 2000))), {400}),
    "text/plain body": (lambda r: _raw(b"hello", content_type="text/plain"), {400}),
    "body over 1 MiB": (lambda r: _raw(b'{"prompt": "' + b"x" * (1 << 20) + b'"}'), {413}),
    "unknown model": (lambda r: _json({**_completion(), "model": "gpt-4"}), {404}),
    "unknown route": (lambda r: _json(_completion(), f"/v1/made-up-{r.randrange(10**9)}"), {404}),
    "wrong method": (lambda r: _json(_completion(), "/v1/models"), {405}),
}


@pytest.fixture(scope="module")
def soak_server(story_llama_dir) -> Iterator[tuple[str, GenerationEngine, object]]:
    model, tok = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tok, max_batch=8, max_queue=64, max_model_len=256)
    config = ServerConfig(model_name="story", chat_template=CHAT_TEMPLATE)  # default 1 MiB body limit, no key
    with running_server(create_app(lambda: (engine, tok), config)) as base:
        yield base, engine, tok


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _stream(client: httpx.Client, prompt: str) -> tuple[int, str, bool]:
    """(status, text, ended with an error event) of one streamed greedy completion."""
    body = {"model": "story", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text, errored = [], False
    with client.stream("POST", URL, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, "", False
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                errored |= "error" in chunk
                if "choices" in chunk:
                    text.append(chunk["choices"][0]["text"])
    return 200, "".join(text), errored


def _send_hostile(client: httpx.Client, rng: random.Random, kind: str) -> int:
    path, body, content_type = HOSTILE[kind][0](rng)
    if kind == "temperature 2 top_k 1" and rng.random() < 0.5:  # a client that leaves mid-stream
        with client.stream("POST", path, content=body, headers={"content-type": content_type}) as r:
            for _ in r.iter_lines():
                break
            return r.status_code
    r = client.post(path, content=body, headers={"content-type": content_type})
    return r.status_code


def test_honest_streams_survive_a_hostile_client(soak_server, caplog):
    base, engine, tok = soak_server
    refs = {p: reference_text(engine, tok, completion_ids(tok, p), MAX_TOKENS) for p in PROMPTS}
    rng = random.Random(20)
    honest_results: list[tuple[int, bool, bool]] = []  # (status, text equals reference, error event)
    hostile_results: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def honest(i: int, until: float, once: bool) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            k = i
            while once or time.monotonic() < until:
                prompt = PROMPTS[k % len(PROMPTS)]
                status, text, errored = _stream(client, prompt)
                with lock:
                    honest_results.append((status, text == refs[prompt], errored))
                k += HONEST_CLIENTS
                if once:
                    return

    def hostile(kinds: list[str] | None, until: float) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            queue = list(kinds) if kinds is not None else None
            while (queue if queue is not None else time.monotonic() < until):
                kind = queue.pop(0) if queue is not None else rng.choice(list(HOSTILE))
                status = _send_hostile(client, rng, kind)
                with lock:
                    hostile_results[(kind, status)] += 1

    def run(until: float, once: bool) -> None:
        threads = [threading.Thread(target=honest, args=(i, until, once)) for i in range(HONEST_CLIENTS)]
        threads.append(threading.Thread(target=hostile, args=(list(HOSTILE) if once else None, until)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a client did not finish"

    run(0.0, once=True)  # warm-up: every honest client once, every hostile kind once, then the mix
    run(time.monotonic() + WARMUP_SECONDS, once=False)
    gc.collect()
    rss_before = _rss_bytes()
    started = time.monotonic()
    run(started + SOAK_SECONDS, once=False)
    elapsed = time.monotonic() - started
    gc.collect()
    rss_after = _rss_bytes()

    growth = rss_after / rss_before - 1
    statuses = Counter(s for s, _, _ in honest_results)
    wrong = sum(1 for s, same, err in honest_results if s == 200 and (not same or err))
    unexpected = {k: n for k, n in hostile_results.items() if k[1] not in HOSTILE[k[0]][1]}
    hostile_statuses = Counter()
    for (_, status), n in hostile_results.items():
        hostile_statuses[status] += n
    print(f"\nsoak: {elapsed:.1f} s after a {WARMUP_SECONDS:g} s warm-up; over both: {len(honest_results)} honest "
          f"streams (statuses {dict(statuses)}, {wrong} differing from the greedy reference), "
          f"{sum(hostile_results.values())} hostile requests ({len({k for k, _ in hostile_results})} kinds; statuses "
          f"{dict(hostile_statuses)}), RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB ({growth:+.2%})")
    assert statuses == {200: len(honest_results)} and wrong == 0
    assert not unexpected, unexpected
    assert {k for k, _ in hostile_results} == set(HOSTILE)
    assert not [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert growth < RSS_GROWTH_LIMIT
    assert engine.running == 0 and engine.queue_depth == 0
