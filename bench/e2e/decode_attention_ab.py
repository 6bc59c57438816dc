"""A/B of the decode step's attention on the CPU: the decode-attention kernel (sparsefast.ops.attention_cpu, the
cache read in place) against torch SDPA over the gathered cache rows with a position mask (what the batched runner
ran before), in the compiled batch-1 step of SmolLM2-135M-Instruct.

Each (dtype, weights, attention) variant runs in a process of its own, rounds interleaved: SmolLM2 in fp32 or bf16,
dense or magnitude 2:4 (the speed depends on the pattern, not on the method), the CPU kernels swapped in without
timing (sparsify_ auto, calibrate=False: every candidate layer takes the kernel), `LlamaBatchRunner` + `CompiledRunner`
(max_batch 1), a 32-token prompt, then 64 greedy tokens, three times; the median ms per token of the three (prefill
excluded) and the generated tokens, which must be the same for both attentions.

    python bench/e2e/decode_attention_ab.py --rounds 3   # writes bench/results/<date>-cpu-decode-attention-ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = [(dtype, weights) for weights in ("dense", "2:4") for dtype in ("float32", "bfloat16")]
ATTENTIONS = ("kernel", "sdpa")


def worker(dtype: str, weights: str, attention: str, prompt_len: int, new_tokens: int) -> dict:
    """One variant in this process: {"ms_per_token": [3 runs], "tokens": [...]}."""
    import torch

    from sparsefast.api import load, prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import SparsifyConfig, sparsify_
    from sparsefast.serve.compiled import CompiledRunner
    from sparsefast.serve.runner import LlamaBatchRunner

    model, _ = load("smollm2", dtype=dtype)
    if weights == "2:4":
        prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    sparsify_(model, SparsifyConfig(mode="auto", calibrate=False))
    max_len = prompt_len + new_tokens + 1
    eager = LlamaBatchRunner(model, 1, max_len, torch.device("cpu"))
    if attention == "sdpa":
        eager.decode_kernel = False
    elif not eager.decode_kernel:
        raise SystemExit("the decode-attention kernel does not run here (CPU extension not built?)")
    runner = CompiledRunner(eager, 1, max_len)
    prompt = list(range(1000, 1000 + prompt_len))
    times, tokens = [], []
    with torch.inference_mode():
        for _ in range(1 + 3):  # a warm-up generation, then three timed
            tok = int(runner.prefill([0], [prompt])[0].argmax())
            out = [tok]
            t0 = time.perf_counter()
            for i in range(new_tokens):
                tok = int(runner.decode([0], [tok], [prompt_len + i])[0].argmax())
                out.append(tok)
            times.append((time.perf_counter() - t0) / new_tokens * 1e3)
            tokens = out
    return {"ms_per_token": times[1:], "tokens": tokens, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--worker", nargs=3, metavar=("DTYPE", "WEIGHTS", "ATTENTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.prompt_len, args.new_tokens)))
        return 0
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    from sparsefast.bench.results import load_average, write_result

    runs: dict[str, list] = {}
    loads = []
    for r in range(args.rounds):
        for dtype, weights in VARIANTS:
            for attention in ATTENTIONS if r % 2 == 0 else ATTENTIONS[::-1]:
                name = f"{dtype} {weights} {attention}"
                loads.append(load_average())
                proc = subprocess.run([sys.executable, __file__, "--worker", dtype, weights, attention,
                                       "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{name}: worker failed (exit {proc.returncode})")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.setdefault(name, []).append(result)
                print(f"round {r + 1} {name}: {statistics.median(result['ms_per_token']):.2f} ms/token", flush=True)
    summary = {}
    for dtype, weights in VARIANTS:
        kernel, sdpa = (runs[f"{dtype} {weights} {a}"] for a in ATTENTIONS)
        med = {a: statistics.median(t for run in rs for t in run["ms_per_token"]) for a, rs in zip(ATTENTIONS,
                                                                                                   (kernel, sdpa))}
        summary[f"{dtype} {weights}"] = {
            "kernel_ms_per_token": med["kernel"], "sdpa_ms_per_token": med["sdpa"],
            "speedup": med["sdpa"] / med["kernel"],
            "same_tokens": all(k["tokens"] == s["tokens"] for k, s in zip(kernel, sdpa))}
    if not summary:
        raise SystemExit("nothing was measured")
    paths = write_result("decode-attention-ab", {
        "protocol": __doc__.split("\n\n")[1], "rounds": args.rounds, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "load_average_before_each_run": loads, "load_average_after": load_average(),
        "summary": summary, "raw": runs}, device="cpu")
    for name, s in summary.items():
        print(f"{name}: kernel {s['kernel_ms_per_token']:.2f} vs SDPA {s['sdpa_ms_per_token']:.2f} ms/token "
              f"({s['speedup']:.2f}x), same tokens: {s['same_tokens']}")
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
