"""Serving benchmark: a real HTTP client (httpx, streaming SSE) against OpenAI-compatible servers, side by side.

Each variant is a server: `sparsefast serve MODEL` or `transformers serve DIR` started here in a subprocess on a free
127.0.0.1 port, or an already-running server given by URL. For every concurrency level, `num_prompts` requests with
fixed prompt length and fixed output length (greedy; `ignore_eos` on sparsefast, `min_new_tokens` on transformers)
are sent with at most `concurrency` in flight, optionally with Poisson arrivals. Variants are measured round-robin per
concurrency level, so they share the machine's conditions.

Metrics as vLLM's benchmarks/benchmark_serving.py defines them:
  TTFT  time from sending the request to the first non-empty text chunk
  TPOT  per request (e2e latency - TTFT) / (output tokens - 1)
  ITL   every gap between two successive text chunks, pooled over requests
  E2EL  time from sending the request to the end of its stream
  request throughput = completed requests / wall time of the level; output throughput = output tokens / wall time
Output tokens come from the server's `usage` (stream_options.include_usage); a server that sends none gets its text
re-tokenized with the benchmark's tokenizer (recorded per variant). sparsefast.bench.serving_report turns a run into
the result (settings, ratios against a baseline, the plot).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
KINDS = ("sparsefast", "transformers", "transformers-cb", "url")


@dataclass
class Variant:
    """One server to measure. kind: "sparsefast" | "transformers" | "transformers-cb" (transformers serve
    --continuous-batching) | "url"; target: MODEL, DIR or base URL."""
    name: str
    kind: str
    target: str
    base_url: str = ""
    model_id: str = ""
    process: Any = None
    log_path: str = ""
    load_s: float | None = None
    token_count_source: str = "usage"
    error: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """"NAME=KIND:TARGET", e.g. dense=sparsefast:smollm2, peer=transformers:/ckpt/dense, x=url:http://h:p"""
        name, eq, rest = spec.partition("=")
        kind, colon, target = rest.partition(":")
        if not eq or not colon or kind not in KINDS or not name or not target:
            raise ValueError(f"--variant {spec!r}: expected NAME=KIND:TARGET with KIND one of {', '.join(KINDS)} "
                             "(e.g. dense=sparsefast:smollm2)")
        return cls(name=name, kind=kind, target=target)


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    error: str | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(v: Variant, *, device: str, max_batch: int, max_queue: int, log_dir: Path | None,
                 extra_args: Sequence[str] = ()) -> None:
    """Launch the variant's server process (nothing to launch for kind "url"); `extra_args` go to `sparsefast serve`."""
    if v.kind == "url":  # a server someone else started; its model id must be the variant's name
        v.base_url, v.model_id = v.target.rstrip("/"), v.name
        return
    port = free_port()
    v.base_url = f"http://127.0.0.1:{port}"
    if v.kind == "sparsefast":
        v.model_id = v.name
        cmd = [sys.executable, "-m", "sparsefast", "serve", v.target, "--port", str(port), "--device", device,
               "--served-model-name", v.name, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
               "--log-level", "warning", *extra_args]
    else:
        exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        v.model_id = v.target
        cmd = [exe, "serve", v.target, "--host", "127.0.0.1", "--port", str(port), "--device", device,
               "--log-level", "warning"] + (["--continuous-batching"] if v.kind == "transformers-cb" else [])
    v.log_path = str(log_dir / f"{v.name}.log")
    log = open(v.log_path, "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    v.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    v.load_s = time.perf_counter()


def wait_ready(v: Variant, timeout: float) -> None:
    """Poll GET /health until 200 (sets load_s to the time it took); records an error if the process died."""
    import httpx

    started = v.load_s or time.perf_counter()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if v.process is not None and v.process.poll() is not None:
            v.error = f"server exited with code {v.process.returncode} before serving; log: {v.log_path}"
            return
        try:
            if httpx.get(v.base_url + "/health", timeout=2).status_code == 200:
                v.load_s = time.perf_counter() - started if v.process is not None else None
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    v.error = f"not healthy within {timeout:.0f} s; log: {v.log_path}"


def stop_server(v: Variant) -> None:
    if v.process is None or v.process.poll() is not None:
        return
    v.process.terminate()
    try:
        v.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        v.process.kill()
        v.process.wait(timeout=10)


def request_body(v: Variant, prompt: str, output_len: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if v.model_id:
        body["model"] = v.model_id
    if v.kind.startswith("transformers"):
        # transformers serve ignores stream_options and has no ignore_eos; min_new_tokens fixes the length instead
        body.pop("stream_options")
        body["generation_config"] = json.dumps({"max_new_tokens": output_len, "min_new_tokens": output_len,
                                                "do_sample": False})
    else:
        body["ignore_eos"] = True
    return body


async def send_request(client: Any, v: Variant, prompt: str, output_len: int) -> RequestResult:
    """One streamed completion; times are taken when each SSE line arrives."""
    res = RequestResult(ok=False)
    pieces: list[str] = []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", v.base_url + "/v1/completions", json=request_body(v, prompt, output_len)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:300]
                    return res
                if obj.get("usage"):
                    res.output_tokens = int(obj["usage"]["completion_tokens"])
                    res.prompt_tokens = int(obj["usage"]["prompt_tokens"])
                for choice in obj.get("choices") or ():
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        now = time.perf_counter()
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        pieces.append(piece)
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.text = "".join(pieces)
    res.ok = res.ttft is not None
    return res


async def run_level(v: Variant, prompts: list[str], output_len: int, concurrency: int,
                    request_rate: float, seed: int) -> tuple[list[RequestResult], float]:
    """All prompts against one server with at most `concurrency` in flight; returns (results, wall seconds)."""
    import httpx

    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def limited(p: str) -> RequestResult:
            async with sem:
                return await send_request(client, v, p, output_len)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """vLLM's serving metrics over one level (times in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s, "total_output_tokens": out_tokens,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]))
        if any(r.prompt_tokens is not None for r in ok) else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "request_throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "output_throughput_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl]), "e2el_ms": _stats([r.latency for r in ok]),
    }


def make_prompts(tokenizer: Any, n: int, prompt_len: int, text: str, offset: int = 0) -> list[str]:
    """`n` distinct prompts of about `prompt_len` tokens: consecutive windows of `text`, decoded to strings (both
    servers get text; the exact prompt token counts come back in `usage`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = (offset + n) * prompt_len
    if len(ids) < need:
        raise ValueError(f"prompt text has {len(ids)} tokens, {need} needed; lower --num-prompts or --prompt-len")
    return [tokenizer.decode(ids[(offset + i) * prompt_len:(offset + i + 1) * prompt_len]) for i in range(n)]


def fill_token_counts(v: Variant, results: list[RequestResult], tokenizer: Any) -> None:
    """Servers that send no usage: count output tokens by re-tokenizing the generated text."""
    for r in results:
        if r.ok and r.output_tokens == 0:
            r.output_tokens = len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
            v.token_count_source = "re-tokenized text (server sent no usage)"


def run_benchmark(variants: list[Variant], *, tokenizer: Any, text: str, concurrencies: list[int],
                  prompt_len: int, output_len: int, prompts_per_level: dict[int, int], request_rate: float,
                  device: str, max_batch: int, max_queue: int, load_timeout: float, log_dir: Path,
                  rounds: int = 1, seed: int = 0) -> dict[str, Any]:
    """Start every server (one after the other, each once the previous one is ready), measure each concurrency
    level round-robin across variants (`rounds` times, fresh prompts each round; a level's metrics pool the requests
    of all rounds, wall time summed), stop the servers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {v.name: {} for v in variants}

    def terminated(signum: int, _frame: Any) -> None:  # `timeout` / kill: still stop the servers (finally below)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for v in variants:  # one at a time: a server that times its sparse-linear swap while loading needs a quiet CPU
            start_server(v, device=device, max_batch=max_batch, max_queue=max_queue, log_dir=log_dir)
            wait_ready(v, load_timeout)
            print(f"  {v.name:>20} " + (v.error or "ready" if v.load_s is None else f"ready after {v.load_s:.1f} s"),
                  flush=True)
        live = [v for v in variants if v.error is None]
        warm = make_prompts(tokenizer, 1, prompt_len, text, offset=0)
        for v in live:  # one short request each, not measured: first-call allocations and lazy inits
            wr, _ = asyncio.run(run_level(v, warm, min(output_len, 8), 1, float("inf"), seed))
            if not wr[0].ok:
                v.error = f"warm-up request failed: {wr[0].error}"
        live = [v for v in live if v.error is None]
        offset = 1
        for c in concurrencies:
            pooled: dict[str, tuple[list[RequestResult], float, list[dict[str, Any]]]] = {v.name: ([], 0.0, [])
                                                                                          for v in live}
            for r in range(rounds):
                n = prompts_per_level[c]
                prompts = make_prompts(tokenizer, n, prompt_len, text, offset=offset)
                offset += n
                # alternate the order so no variant always runs right after the same neighbour
                for v in (live if r % 2 == 0 else live[::-1]):
                    level, wall = asyncio.run(run_level(v, prompts, output_len, c, request_rate, seed))
                    fill_token_counts(v, level, tokenizer)
                    reqs, total, per_round = pooled[v.name]
                    per_round.append(summarize(level, wall))
                    pooled[v.name] = (reqs + level, total + wall, per_round)
                    print(f"  {v.name:>20} c={c:<3} round {r + 1}/{rounds} {_line(per_round[-1])}", flush=True)
            for v in live:
                reqs, total, per_round = pooled[v.name]
                results[v.name][str(c)] = {**summarize(reqs, total), "rounds": per_round}
    finally:
        for v in variants:
            stop_server(v)
        signal.signal(signal.SIGTERM, previous)
    keep = ("name", "kind", "target", "base_url", "model_id", "log_path", "load_s", "token_count_source", "error")
    return {"variants": [{**{k: getattr(v, k) for k in keep}, "levels": results[v.name]} for v in variants]}


def _line(s: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"
    return (f"ok {s['completed']}/{s['completed'] + s['failed']}  TTFT p50 {f(s['ttft_ms']['p50'])} ms  "
            f"TPOT p50 {f(s['tpot_ms']['p50'])} ms  out {f(s['output_throughput_tok_s'])} tok/s")
