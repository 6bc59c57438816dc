"""Exported models run by the engines users deploy on, next to sparsefast: the implementation behind
bench/e2e/export_equality.py, bench/e2e/export_decode.py and the slow tests in tests/export/.

* `llama_cpp_run`: llama.cpp (llama-cpp-python, in the peer venv bench/peers/llama_cpp.sh makes) runs a GGUF file in
  a worker process (sparsefast/bench/peer_worker.py, the one the decode benchmark uses): greedy token ids after a
  prompt of ids, and decode tokens/s.
* `sparsefast_greedy`: the same greedy continuation from sparsefast's model (KV-cached forward, argmax, EOS not
  special), the reference both engines are compared with.
* `vllm_server` / `completion`: vLLM's OpenAI server (peer venv bench/peers/vllm_cpu.sh) and `sparsefast serve`,
  each started as a process on 127.0.0.1 and asked for the same greedy completion.

Peer venvs are found from $SPARSEFAST_LLAMA_CPP_VENV / $SPARSEFAST_VLLM_VENV (`peer_python` says how to make them).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefast.bench import decode_run
from sparsefast.bench.serving import Variant, free_port, start_server, stop_server, wait_ready
from sparsefast.models.loading import cache_argument, returned_cache

PEERS = {"llama_cpp": ("SPARSEFAST_LLAMA_CPP_VENV", "bench/peers/llama_cpp.sh"),
         "vllm": ("SPARSEFAST_VLLM_VENV", "bench/peers/vllm_cpu.sh")}


def peer_python(peer: str) -> Path:
    """The python of peer venv `peer` ("llama_cpp" or "vllm"), from its environment variable. Raises
    FileNotFoundError with the command that makes it when the variable is unset or the venv lacks a python."""
    var, script = PEERS[peer]
    venv = os.environ.get(var)
    python = Path(venv or "") / "bin" / "python"
    if not venv or not python.is_file():
        raise FileNotFoundError(f"no {peer} peer venv: run `bash {script} VENV` and set {var}=VENV")
    return python


def llama_cpp_run(gguf: str | os.PathLike, prompt_ids: list[int], max_tokens: int, *, threads: int | None = None,
                  repeats: int = 1, timeout: float = 900) -> dict[str, Any]:
    """Run `gguf` in llama.cpp (peer venv), loaded once, `repeats` times: {"tokens": the greedy token ids (the same on
    every repeat, else RuntimeError), "llama_cpp": version, "extra_bufts": whether its extra CPU buffer types were on
    (peer_worker.py), "decode_tokens_per_s": [per repeat], "prompt_s": [per repeat, time to the first token]}.
    Raises RuntimeError with the worker's error when it fails."""
    threads = threads or os.cpu_count()
    argv = [str(peer_python("llama_cpp")), str(decode_run.PEER_WORKER), "llama_cpp", str(gguf), "--threads",
            str(threads), "--max-len", str(len(prompt_ids) + max_tokens + 8)]
    variant = decode_run.Variant(name="llama_cpp", argv=argv, kind="llama_cpp", precision="gguf", concurrent=False)
    with tempfile.TemporaryDirectory(prefix="sparsefast-llama-cpp-") as tmp:
        worker = decode_run.Worker(variant, Path(tmp) / "worker.log", timeout_s=timeout)
        try:
            rounds = [worker.ask({"prompts": [list(prompt_ids)], "new_tokens": max_tokens}, timeout_s=timeout)
                      for _ in range(max(1, repeats))]
        finally:
            worker.close()
    errors = [r["error"] for r in rounds if "result" not in r]
    if errors:
        raise RuntimeError(f"llama.cpp failed on {gguf}: {errors[0]}")
    results = [r["result"] for r in rounds]
    tokens = results[0]["token_ids"]
    if any(r["token_ids"] != tokens for r in results):
        raise RuntimeError(f"llama.cpp gave different greedy tokens on a repeat of {gguf}")
    return {"tokens": tokens, "llama_cpp": worker.ready["version"], "extra_bufts": worker.ready.get("extra_bufts"),
            "prompt_s": [r["ttft_s"] for r in results],
            "decode_tokens_per_s": [1 / r["tpot_s"] if max_tokens > 1 else None for r in results]}


@torch.inference_mode()
def sparsefast_greedy(model: nn.Module, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """`max_tokens` greedy token ids after `prompt_ids` from `model` (batch 1, KV cache, EOS not special)."""
    device = next(model.parameters()).device
    cache_name = cache_argument(model)
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), use_cache=True, **{cache_name: returned_cache(out)})
    return tokens


@contextlib.contextmanager
def vllm_server(model_dir: str | os.PathLike, *, log_dir: Path, name: str = "vllm", timeout: float = 900,
                max_model_len: int = 2048) -> Iterator[Variant]:
    """vLLM's OpenAI server (`vllm serve`, peer venv) on `model_dir`, float32, eager (no compile), remote config
    code allowed (the nemotron-nas config class sparsefast.export.vllm writes beside the weights); yields the ready
    server as a serving Variant and stops it on exit. Raises RuntimeError if it does not become healthy."""
    port = free_port()
    v = Variant(name=name, kind="url", target=str(model_dir), base_url=f"http://127.0.0.1:{port}",
                model_id=str(model_dir), log_path=str(log_dir / f"{name}.log"))
    python = peer_python("vllm")
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--trust-remote-code",
           "--max-model-len", str(max_model_len), "--max-num-seqs", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(v.log_path, "w") as log:
        v.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    with _ready(v, timeout):
        yield v


@contextlib.contextmanager
def sparsefast_server(model: str, *, log_dir: Path, name: str = "sparsefast", timeout: float = 600
                      ) -> Iterator[Variant]:
    """`sparsefast serve model` (CPU, dense linears as loaded) as a ready serving Variant; stopped on exit."""
    v = Variant(name=name, kind="sparsefast", target=model)
    start_server(v, device="cpu", max_batch=1, max_queue=4, log_dir=log_dir)
    with _ready(v, timeout):
        yield v


@contextlib.contextmanager
def _ready(v: Variant, timeout: float) -> Iterator[None]:
    """Wait until the started server `v` is healthy (RuntimeError naming its log if not); stop it on exit."""
    try:
        wait_ready(v, timeout)
        if v.error:
            raise RuntimeError(f"{v.name} did not start: {v.error}")
        yield
    finally:
        stop_server(v)


def completion(v: Variant, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One greedy /v1/completions request (temperature 0, EOS still ends it): {"text", "finish_reason", "usage"}."""
    import httpx

    body = {"model": v.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    resp = httpx.post(v.base_url + "/v1/completions", json=body, timeout=300)
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    return {"text": choice["text"], "finish_reason": choice.get("finish_reason"), "usage": resp.json().get("usage")}


def peer_versions() -> dict[str, str | None]:
    """Versions of the peer engines found (None where the venv is missing)."""
    versions: dict[str, str | None] = {}
    for peer, module in (("llama_cpp", "llama_cpp"), ("vllm", "vllm")):
        try:
            python = peer_python(peer)
        except FileNotFoundError:
            versions[peer] = None
            continue
        out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__version__)"],
                             capture_output=True, text=True, timeout=300)
        versions[peer] = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
    return versions
