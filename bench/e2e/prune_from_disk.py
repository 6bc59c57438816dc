"""Peak memory of `sparsefast prune --from-disk on` and `prune-structured --from-disk on` against the fully-loaded
path on a random LLaMA of a given size, and whether their checkpoints are the same bytes (issue 26).

The model: LLaMA architecture, hidden 2048, MLP 5632, 16 heads (4 KV heads), the story llama's 2048-token vocabulary
and tokenizer, as many decoder layers as make at least --gib GiB of fp32 weights, weights N(0, 0.02) from a fixed
seed, norms 1. It is written layer by layer (sparsefast.models.safetensors_stream) into --work-dir and reused by later
runs (a marker file says it is ours). Each case runs its command (`sparsefast prune` or `prune-structured`) twice in
child processes, --from-disk on and off, one after the other (never side by side). Each child reports its own peak
RSS (VmHWM) as it exits (PEAK_RSS_SHIM says why not wait4's rusage); it counts every resident page of the process,
the Python, torch and transformers it imports too (~0.5 GB here).

    python bench/e2e/prune_from_disk.py --gib 2 --gib 4      # writes bench/results/<date>-cpu-prune-from-disk.json

Exits non-zero when a case failed, the two checkpoints differ, or nothing was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = "sparsefast-bench-random-llama.json"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=2048, max_position_embeddings=2048, tie_word_embeddings=False)
CASES = {"wanda-2:4": ["prune", "--method", "wanda", "--pattern", "2:4"],
         "sparsegpt-50%": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
         # LLM-Pruner's block-wise setting: element-wise first-order Taylor, 20% of heads and MLP channels per layer
         "structured-20%": ["prune-structured", "--ratio", "0.2", "--importance", "element1", "--device", "cpu"]}


def make_model(directory: Path, gib: float, tokenizer_dir: Path) -> dict:
    """The random LLaMA of at least `gib` GiB in `directory` (reused when our marker says the same size)."""
    import torch
    import transformers

    from sparsefast.models.safetensors_stream import CheckpointWriter, TensorSpec

    marker = directory / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("gib") == gib:
            return info
        raise SystemExit(f"{directory} holds another size ({info.get('gib')} GiB); use another --work-dir")
    if directory.exists():
        raise SystemExit(f"{directory} exists and is not ours (no {MARKER}); use another --work-dir")
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=1)
    with torch.device("meta"):
        one = transformers.LlamaForCausalLM(config)
    state = one.state_dict()
    outside = {n: t for n, t in state.items() if not n.startswith("model.layers.")}
    layer = {n.removeprefix("model.layers.0."): t for n, t in state.items() if n.startswith("model.layers.0.")}
    per_layer = sum(t.numel() * 4 for t in layer.values())
    layers = max(1, math.ceil((gib * 2**30 - sum(t.numel() * 4 for t in outside.values())) / per_layer))
    config.num_hidden_layers = layers
    specs = [TensorSpec(n, torch.float32, tuple(t.shape)) for n, t in outside.items()]
    specs += [TensorSpec(f"model.layers.{i}.{n}", torch.float32, tuple(t.shape)) for i in range(layers)
              for n, t in layer.items()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))  # ours alone
    gen = torch.Generator().manual_seed(0)
    try:
        with CheckpointWriter(tmp, specs, total_parameters=sum(math.prod(s.shape) for s in specs)) as writer:
            for spec in specs:
                norm = spec.name.endswith("norm.weight")
                value = torch.ones(spec.shape) if norm else torch.randn(spec.shape, generator=gen) * 0.02
                writer.write(spec.name, value)
        config.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False).save_pretrained(tmp)
        info = {"gib": gib, "layers": layers, "weight_bytes": sum(s.nbytes for s in specs), "config": SHAPE}
        (tmp / MARKER).write_text(json.dumps(info))
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


# PEAK_RSS_SHIM runs `python -m sparsefast ARGS` and, at exit, writes the process's own peak RSS (VmHWM of its
# address space) to $PEAK_RSS_FILE. Not getrusage/wait4: a child's ru_maxrss starts from the peak of the address
# space it replaced at exec, i.e. the parent's (subprocess forks with vfork), so it would count this benchmark's peak
REPORT_PEAK_AT_EXIT = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_RSS_FILE"], "w") as f:
        f.write(str(kib * 1024))
atexit.register(peak)
"""
PEAK_RSS_SHIM = REPORT_PEAK_AT_EXIT + """
sys.argv = ["sparsefast", *sys.argv[1:]]
runpy.run_module("sparsefast", run_name="__main__", alter_sys=True)
"""
# the imports `sparsefast prune` makes before it reads any weight: the part of every peak no model causes
BASELINE_SHIM = REPORT_PEAK_AT_EXIT + "import transformers.modeling_utils, sparsefast.api, sparsefast.data\n"


def run_child(code: str, argv: list[str], peak_file: Path) -> tuple[subprocess.CompletedProcess, float, int | None]:
    """`python -c CODE ARGV` in a child: (its result, wall seconds, its peak RSS or None)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, "PEAK_RSS_FILE": str(peak_file)})
    wall = time.perf_counter() - t0
    peak = int(peak_file.read_text()) if peak_file.is_file() else None
    return proc, wall, peak


def run_prune(src: Path, out: Path, mode: str, case: list[str], calib: list[str]) -> dict:
    """One `sparsefast prune` / `prune-structured` child (case: the subcommand, then its options) into `out` (which
    does not exist yet): wall time, its peak RSS (VmHWM), exit status and its last output lines."""
    argv = [case[0], str(src), *case[1:], *calib, "--out", str(out), "--from-disk", mode, "--no-progress"]
    proc, wall, peak = run_child(PEAK_RSS_SHIM, argv, out.with_name(out.name + ".peak-rss"))
    return {"from_disk": mode, "exit_code": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak,
            "output_tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:],
            "command": f"{sys.executable} -m sparsefast {' '.join(argv)}"}


def baseline_rss(outputs: Path) -> int | None:
    """Peak RSS of a Python process that imports what `sparsefast prune` imports, then exits."""
    return run_child(BASELINE_SHIM, [], outputs / "baseline.peak-rss")[2]


def mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None


def same_files(a: Path, b: Path) -> dict[str, bool]:
    names = sorted(p.name for p in a.iterdir() if p.name.endswith((".safetensors", ".json"))
                   and p.name not in ("sparsefast.json", "sparsefast-output.json"))
    return {n: (b / n).is_file() and (a / n).read_bytes() == (b / n).read_bytes() for n in names}


def measure(work: Path, outputs: Path, sizes: list[float], cases: list[str], calib: list[str],
            tokenizer_dir: Path) -> tuple[list[dict], bool]:
    """Every size x case, --from-disk on then off, pruned checkpoints written under `outputs`: (results, whether
    any case failed or differed)."""
    from sparsefast.bench.results import load_average

    results, failed = [], False
    for gib in sizes:
        src = work / f"random-llama-{gib:g}gib"
        info = make_model(src, gib, tokenizer_dir)
        print(f"model {src}: {info['layers']} layers, {info['weight_bytes'] / 2**30:.2f} GiB", flush=True)
        for case in cases:
            outs = {mode: outputs / f"out-{gib:g}-{case.replace(':', '')}-{mode}" for mode in ("on", "off")}
            runs = {mode: run_prune(src, out, mode, CASES[case], calib) for mode, out in outs.items()}
            for mode, r in runs.items():
                peak = r["peak_rss_bytes"] or 0
                print(f"  {case} --from-disk {mode}: exit {r['exit_code']}, peak RSS {peak / 2**30:.2f} GiB "
                      f"({peak / info['weight_bytes']:.1%} of the model), {r['wall_s']:.0f} s", flush=True)
            ok = all(r["exit_code"] == 0 and r["peak_rss_bytes"] for r in runs.values())
            same = same_files(outs["on"], outs["off"]) if ok else {}
            equal = ok and bool(same) and all(same.values())
            failed |= not equal
            results.append({"gib": gib, "layers": info["layers"], "weight_bytes": info["weight_bytes"],
                            "case": case, "runs": list(runs.values()), "files_equal": same, "bit_identical": equal,
                            "streamed_rss_fraction": (runs["on"]["peak_rss_bytes"] or 0) / info["weight_bytes"],
                            "full_rss_fraction": (runs["off"]["peak_rss_bytes"] or 0) / info["weight_bytes"],
                            "load_after": load_average()})
            print(f"  {case}: checkpoints {'byte-identical' if equal else 'DIFFER or failed'}", flush=True)
    return results, failed


def main(argv: list[str] | None = None) -> int:
    from sparsefast.bench.results import write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, action="append", help="model size(s) in GiB of fp32 weights (default 2)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--work-dir", default=None,
                   help="where the random models are kept for later runs (default: a temporary directory, removed)")
    p.add_argument("--shared", default=os.environ.get("SPARSEFAST_SHARED", str(REPO.parent / "shared")))
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep the pruned checkpoints (in an outputs-* directory this run makes in --work-dir)")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    shared = Path(args.shared)
    tokenizer_dir = shared / "models" / "learninglm-story-llama"
    if not tokenizer_dir.is_dir():
        p.error(f"{tokenizer_dir} not found: pass --shared DIR (the ../shared with models/ and data/)")
    os.environ.setdefault("SPARSEFAST_DATA", str(shared / "data"))
    calib = ["--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        outputs = Path(tempfile.mkdtemp(prefix="outputs-", dir=work))  # made here, so removing it removes only ours
        if not args.keep_outputs:
            stack.callback(shutil.rmtree, outputs, ignore_errors=True)
        baseline = baseline_rss(outputs)
        results, failed = measure(work, outputs, args.gib or [2.0], cases, calib, tokenizer_dir)
    if not results:
        print("nothing measured", file=sys.stderr)
        return 1
    paths = write_result("prune-from-disk", {
        "protocol": "sparsefast prune|prune-structured SRC CASE --calib c4 --nsamples N --seqlen L --out OUT "
                    "--from-disk on|off, each in its own child process, one after the other; peak RSS = the "
                    "child's VmHWM at exit; checkpoints compared byte for byte (safetensors, config, generation "
                    "config, tokenizer, structure.json)",
        "cases": {case: CASES[case] for case in cases},
        "nsamples": args.nsamples, "seqlen": args.seqlen, "model_shape": SHAPE, "mem_total_bytes": mem_total(),
        "import_baseline_rss_bytes": baseline, "results": results}, device="cpu")
    print(f"wrote {paths[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
