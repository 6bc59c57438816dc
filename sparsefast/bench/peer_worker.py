"""One decode peer — llama.cpp (llama-cpp-python) or vLLM's CPU backend — kept loaded in its own venv and timed on
request, for sparsefast.bench.decode_run. Run by path with the peer venv's python (that venv has no sparsefast, so
this file imports only the standard library and the peer's own package):

    VENV/bin/python sparsefast/bench/peer_worker.py llama_cpp MODEL.gguf --threads 2 --max-len 160
    VENV/bin/python sparsefast/bench/peer_worker.py vllm MODEL_DIR --dtype float32 --max-len 160

Protocol (the one sparsefast.bench.decode_worker speaks): after loading, one JSON line {"ready": {...}} on stdout;
then for each JSON line {"prompts": [[ids], ...], "new_tokens": N} on stdin, one JSON line {"result": {...}}; an
empty line or EOF ends it. Every request makes exactly N tokens (EOS ignored); prompts are token ids of the model's
own vocabulary. Anything the peer prints goes to stderr.

Timings (a dict per round, seconds):
* llama_cpp decodes one sequence at a time (llama-cpp-python has no batched API), so it answers rounds of one
  prompt: each generated token is timestamped as it comes; ttft_s, tpot_s = (last - first) / (N - 1), median_itl_s.
* vllm generates every prompt of the round in one `LLM.generate` call (its scheduler batches them); it reports no
  per-token times through that call, so the round is run twice, with max_tokens 1 and N: tpot_s = (t_N - t_1) /
  (N - 1), the time a decode step adds per token (prefill excluded, as TPOT excludes it); output_tokens_per_s =
  len(prompts) * N / t_N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _amx_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_tile" in f.read()
    except OSError:
        return False


def _llama_cpp(args: argparse.Namespace):
    import llama_cpp
    import llama_cpp.llama as llama_module

    # llama.cpp's extra CPU buffer types repack weights for AMX / other kernels at load. On the AMX Xeons this project
    # ran on, its AMX path killed the process with SIGSEGV at the first decode of a Q8_0 file (also of one quantized by
    # llama.cpp itself), F32 ran: "auto" turns them off on CPUs with AMX, and the ready line says which was used.
    extra_bufts = args.extra_bufts == "on" or (args.extra_bufts == "auto" and not _amx_cpu())
    if not extra_bufts:
        default_params = llama_module.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_extra_bufts
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.max_len, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)

    def run(prompts: list[list[int]], n: int) -> dict:
        if len(prompts) != 1:
            raise ValueError("llama_cpp: llama-cpp-python decodes one sequence at a time; send one prompt per round")
        t0 = time.perf_counter()
        times, ids = [], []
        for token in llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):  # greedy, never stops at EOS by itself
            times.append(time.perf_counter())
            ids.append(int(token))
            if len(ids) == n:
                break
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {"tokens": len(ids), "token_ids": ids, "ttft_s": times[0] - t0,
                "tpot_s": (times[-1] - times[0]) / max(n - 1, 1),
                "median_itl_s": statistics.median(gaps) if gaps else None, "wall_s": times[-1] - t0}

    info = {"peer": "llama_cpp", "version": llama_cpp.__version__, "threads": args.threads,
            "model_bytes": os.path.getsize(args.model), "extra_bufts": extra_bufts}
    return run, info


def _vllm(args: argparse.Namespace):
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_len, seed=0)
    load_s = time.perf_counter() - t0

    def timed(prompts: list[list[int]], n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        dt = time.perf_counter() - t
        made = [len(o.outputs[0].token_ids) for o in outs]
        if made != [n] * len(prompts):
            raise RuntimeError(f"vllm made {made} tokens, expected {n} each")
        return dt

    def run(prompts: list[list[int]], n: int) -> dict:
        t1 = timed(prompts, 1)
        tn = timed(prompts, n)
        return {"tokens": n, "t1_s": t1, "tn_s": tn, "tpot_s": (tn - t1) / max(n - 1, 1),
                "output_tokens_per_s": len(prompts) * n / tn}

    return run, {"peer": "vllm", "version": vllm.__version__, "dtype": args.dtype, "load_s": load_s}


PEERS = {"llama_cpp": _llama_cpp, "vllm": _vllm}


def protocol_stream():
    """The process's real stdout, for protocol lines only; file descriptor 1 (and sys.stdout) then point at stderr,
    so nothing the engine or its child processes print (vLLM's engine process inherits fd 1) reaches the protocol."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def serve_requests(out, ready: dict, handle) -> None:
    """Write {"ready": ready}, then one reply line per request line on stdin (handle(request) -> reply dict; an
    exception becomes {"error": ...}, recorded by the parent) until an empty line or EOF."""
    out.write(json.dumps({"ready": ready}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            reply = handle(json.loads(line))
        except Exception as exc:  # a peer failing is part of the result
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("model", help="llama_cpp: a .gguf file; vllm: a checkpoint directory")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama_cpp threads (default: all cores)")
    p.add_argument("--dtype", default="auto", help="vllm dtype (float32, bfloat16, ...)")
    p.add_argument("--max-len", type=int, default=512, help="context positions (prompt + new tokens)")
    p.add_argument("--extra-bufts", choices=("auto", "on", "off"), default="auto",
                   help="llama_cpp: its extra CPU buffer types (weight repacking, AMX); auto: off on AMX CPUs")
    args = p.parse_args(argv)
    out = protocol_stream()
    run, info = PEERS[args.peer](args)
    serve_requests(out, info, lambda request: {"result": run(request["prompts"], int(request["new_tokens"]))})
    return 0


if __name__ == "__main__":  # vLLM's engine process is spawned: the worker must be importable without side effects
    sys.exit(main())
