"""llama.cpp decode speed of dense vs structurally pruned SmolLM2, side by side in one run, from sparsefast's GGUF
export (issue 22's acceptance: the structural speedup survives export and quantization, >= 1.12x at f32).

Each model is exported at every --outtypes value, then llama.cpp (bench/peers/llama_cpp.sh) generates --tokens greedy
tokens --repeats times per file (a fresh context each time), the files interleaved round by round so that a change
of machine load hits all of them alike. Decode tokens/s = (tokens - 1) / time from the first generated token to
the last; the result keeps every repeat, the median and the structural / dense ratio per outtype, and each file's
greedy tokens (a q8_0 file's tokens drift from its f32 file's after a while: quantization, not the export). Run it on
a quiet machine (the load average is recorded). Writes bench/results/YYYY-MM-DD-cpu-llama-cpp-decode-smollm2.json.

    python bench/e2e/export_decode.py --llama-cpp-venv ../peers/llama-cpp --structural /tmp/smollm2-s20 \\
        --outtypes f32,q8_0 --keep-dir /tmp/smollm2-gguf
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

PROMPT = "The capital of France is a city that"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp-venv", required=True, help="venv made by bench/peers/llama_cpp.sh")
    p.add_argument("--structural", required=True, help="structural 20%% SmolLM2 checkpoint (prune-structured)")
    p.add_argument("--dense", default="smollm2", help="the dense model (default: the embedded SmolLM2)")
    p.add_argument("--outtypes", default="f32,q8_0", help="comma-separated GGUF outtypes (default f32,q8_0)")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per repeat (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per file (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    p.add_argument("--keep-dir", default=None, help="keep the GGUF files here (e.g. for other benchmarks)")
    args = p.parse_args()
    os.environ["SPARSEFAST_LLAMA_CPP_VENV"] = args.llama_cpp_venv

    import sparsefast
    from sparsefast.bench.export_peers import llama_cpp_run, peer_versions
    from sparsefast.bench.results import load_average, write_result
    from sparsefast.export.gguf import export_gguf

    outtypes = [t.strip() for t in args.outtypes.split(",") if t.strip()]
    work = Path(args.keep_dir or tempfile.mkdtemp(prefix="export-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[str, str], Path] = {}
    prompt_ids: list[int] = []
    for name, source in (("dense", args.dense), ("structural-20", args.structural)):
        model, tok = sparsefast.load(source)
        prompt_ids = list(tok(PROMPT)["input_ids"])
        for outtype in outtypes:
            files[name, outtype] = export_gguf(model, tok, work / f"smollm2-{name}-{outtype}.gguf", outtype=outtype,
                                               overwrite=True)
        del model
    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in files}
    loads, extra_bufts, tokens = [], set(), {}
    for _ in range(args.repeats):
        loads.append(load_average())
        for key, path in files.items():
            run = llama_cpp_run(path, prompt_ids, args.tokens, threads=args.threads)
            speeds[key].append(run["decode_tokens_per_s"][0])
            tokens.setdefault(f"{key[0]}-{key[1]}", run["tokens"])
            extra_bufts.add(run["extra_bufts"])
    rows = []
    for outtype in outtypes:
        dense = statistics.median(speeds["dense", outtype])
        pruned = statistics.median(speeds["structural-20", outtype])
        rows.append({"outtype": outtype, "dense_tokens_per_s": speeds["dense", outtype],
                     "structural_tokens_per_s": speeds["structural-20", outtype], "dense_median": dense,
                     "structural_median": pruned, "speedup": pruned / dense,
                     "dense_bytes": files["dense", outtype].stat().st_size,
                     "structural_bytes": files["structural-20", outtype].stat().st_size})
        print(f"{outtype}: dense {dense:.1f} tok/s, structural-20 {pruned:.1f} tok/s, {pruned / dense:.3f}x",
              flush=True)
    payload = {"peers": peer_versions(), "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
               "prompt_ids": prompt_ids, "structural": args.structural, "load_average_per_round": loads,
               "llama_cpp_extra_bufts": sorted(extra_bufts), "greedy_tokens": tokens,
               "rows": rows}
    for path in write_result("llama-cpp-decode-smollm2", payload, device="cpu"):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
