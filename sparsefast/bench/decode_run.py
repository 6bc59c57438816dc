"""`sparsefast bench decode` (and bench/e2e/bench_decode.py): decode speed of sparsefast's engine and of the engines a
user would pick instead, side by side in one run, in gpt-fast's units (tokens/s with the weight bytes each token
reads, GB/s against the copy bandwidth measured in the same run).

Each measured thing is a worker process, loaded once and then asked for one measurement at a time (the protocol of
sparsefast/bench/peer_worker.py), so only one of them runs at any moment and rounds interleave them (slow phases of a
shared machine hit all alike; the order alternates between rounds):
* sparsefast variants (sparsefast.bench.decode_worker): {dense, dense-torch, Wanda 2:4, Wanda 50% unstructured} x
  {float32, bfloat16} x {eager, compiled step}, each through the GenerationEngine `sparsefast serve` runs, its
  linears swapped at load as serve swaps them (`sparsify_` mode auto: the timed CPU choice of sparse layouts, the
  dense CPU kernel for the rest), except dense-torch (mode off: torch's F.linear everywhere);
* peers (sparsefast/bench/peer_worker.py, each in its own venv): llama.cpp (llama-cpp-python; F32, BF16, Q8_0 GGUF of
  the same weights, written by sparsefast.export.gguf) and vLLM's CPU backend (the dense checkpoint, float32 and
  bfloat16).
Workers are set up one after the other (a sparse variant times its kernels at load; a second process loading
alongside would skew that timing). The vLLM workers come in a second phase, after the others are measured and closed:
vLLM's engine processes keep about 0.7 of a core busy while idle, which slowed every other worker (2026-12-06); so
their rounds interleave only with each other. Per round and worker: batch 1 (one request) and C concurrent requests
(sparsefast, vLLM; llama-cpp-python decodes one sequence at a time), N new tokens each, EOS ignored.

Under load (`busy_core`): a busy-loop process pinned to that core runs from before the first worker loads to the end
(kernel timing at load included, as a server that starts on a busy machine). The load-time kernel choice is checked
with `choice_loads` more timed swaps of each sparse checkpoint: the layers each swapped in, against the choice of a
swap made before the busy loop started.

Checkpoints: the model is loaded here, saved (dense) and pruned (Wanda with bundled C4 calibration, or magnitude; the
*-int8 variants also quantized, `prune --quantize int8`, "dense-int8" without pruning) into a work directory the
workers load from; `checkpoints` gives existing ones instead. The summary is sparsefast.bench.decode_report's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsefast.bench.decode_options import (
    SPARSITIES,
    DecodeBenchConfig,
    checkpoint_name,
    int8_activations,
    is_int8,
)

PEER_WORKER = Path(__file__).resolve().parent / "peer_worker.py"
READY_TIMEOUT_S = 1800.0  # a cold compile of every bucket, or vLLM's own compile, on a busy 2-core machine


@dataclass
class Variant:
    """One measured thing: its worker command, what it is (kind "sparsefast" | "llama_cpp" | "vllm", precision,
    sparsity, compile) and whether it takes several prompts per request."""

    name: str
    argv: list[str]
    kind: str
    precision: str
    sparsity: str = "dense"
    compiled: bool = False
    concurrent: bool = True
    env: dict[str, str] = field(default_factory=dict)


class Worker:
    """A worker process speaking the JSON-lines protocol; stderr goes to `log_path`."""

    def __init__(self, variant: Variant, log_path: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
        self.variant = variant
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(variant.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env={**os.environ, **variant.env})
        reply = self._read(timeout_s)
        if "ready" not in reply:
            self.close()
            tail = log_path.read_text()[-500:].strip().splitlines()[-1:] if log_path.exists() else []
            raise RuntimeError(f"worker failed to load ({reply.get('error')}): {' '.join(tail)} (log {log_path})")
        self.ready = reply["ready"]

    def _read(self, timeout_s: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return {"error": f"no answer within {timeout_s:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:  # end of its output: the worker exited
            return {"error": f"the worker exited with code {self.proc.wait()}"}
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"error": f"not a line of the protocol: {line[:200]!r}"}

    def ask(self, request: dict, timeout_s: float = 900.0) -> dict:
        """The worker's reply ({"result": ...} or {"error": ...})."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def close(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class BusyCore:
    """A process spinning on one core (pinned with sched_setaffinity) while the block runs: the "another job on
    the machine" condition."""

    def __init__(self, core: int | None) -> None:
        self.core, self.proc = core, None

    def __enter__(self) -> BusyCore:
        if self.core is not None:
            code = f"import os\nos.sched_setaffinity(0, {{{self.core}}})\nwhile True:\n    pass\n"
            self.proc = subprocess.Popen([sys.executable, "-c", code])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def sparsefast_variants(cfg: DecodeBenchConfig, checkpoints: dict[str, str]) -> list[Variant]:
    """Workers of sparsefast.bench.decode_worker for every checkpoint (sparsity name -> dir) x dtype x compile."""
    variants = []
    max_len = cfg.prompt_len + cfg.new_tokens + 1
    for sparsity in cfg.sparsities:
        ckpt = checkpoints[checkpoint_name(sparsity)]
        for dtype in cfg.dtypes:
            for mode in cfg.compile_modes:
                name = f"sparsefast {sparsity} {dtype} {'compiled' if mode == 'on' else 'eager'}"
                argv = [sys.executable, "-m", "sparsefast.bench.decode_worker", ckpt, "--dtype", dtype,
                        "--compile", mode, "--threads", str(cfg.threads or "auto"), "--max-batch",
                        str(cfg.concurrency), "--max-len", str(max_len), "--device", cfg.device,
                        "--sparse", "off" if sparsity == "dense-torch" else "auto",
                        *(["--int8-activations"] if int8_activations(sparsity) else [])]
                variants.append(Variant(name, argv, "sparsefast", dtype, sparsity, compiled=mode == "on"))
    return variants


def peer_variants(cfg: DecodeBenchConfig, ggufs: dict[str, str], dense_dir: str | None,
                  vllm_sparse: dict[str, str] | None = None) -> list[Variant]:
    """llama.cpp workers (one per GGUF type -> file) and vLLM workers (one per dtype, on the dense checkpoint, and on
    each `vllm_sparse` export {sparsity: dir}, run with sparsefast's plugin), run by their venvs' python."""
    variants = []
    threads, max_len = str(cfg.engine_threads), str(cfg.prompt_len + cfg.new_tokens + 1)
    for outtype, path in ggufs.items():
        argv = [cfg.llama_cpp_python, str(PEER_WORKER), "llama_cpp", path, "--threads", threads, "--max-len", max_len]
        variants.append(Variant(f"llama.cpp {outtype.upper()}", argv, "llama_cpp", outtype, concurrent=False))
    models = {"dense": dense_dir, **(vllm_sparse or {})} if dense_dir else dict(vllm_sparse or {})
    for dtype in cfg.dtypes if cfg.vllm_python else ():
        for sparsity, model_dir in models.items():
            argv = [cfg.vllm_python, str(PEER_WORKER), "vllm", model_dir, "--dtype", dtype, "--max-len", max_len]
            # KV cache space in GiB (vLLM's CPU default is sized for servers); OpenMP threads on the cores it may use
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cfg.engine_threads - 1}"}
            name = f"vLLM {dtype}" if sparsity == "dense" else f"vLLM {dtype} {sparsity} (sparsefast plugin)"
            variants.append(Variant(name, argv, "vllm", dtype, sparsity, env=env))
    return variants


def export_for_vllm(cfg: DecodeBenchConfig, checkpoints: dict[str, str], work: Path,
                    progress=print) -> dict[str, str]:
    """{sparsity: directory} of each sparse checkpoint exported for sparsefast's vLLM plugin (`export --to
    vllm-sparse`, each layer's layout timed here as `sparsefast serve` chooses it), when vLLM runs; kept in `work`
    for a later run there."""
    if not cfg.vllm_python:
        return {}
    from sparsefast.api import load
    from sparsefast.export.vllm_sparse import export_vllm_sparse

    out = {}
    for sparsity in dict.fromkeys(map(checkpoint_name, cfg.sparsities)):
        if SPARSITIES[sparsity] is None or is_int8(sparsity):  # the plugin runs float sparse layouts
            continue
        source = checkpoints[sparsity]
        path = work / f"vllm-sparse-{_file_stem(sparsity)}"
        if not _made_here(path, {"export": "vllm-sparse", "source": source}):
            model, tok = load(source)
            export_vllm_sparse(model, tok, path, source=source, overwrite=path.exists())
        out[sparsity] = str(path)
        progress(f"[setup] {sparsity} for vLLM (sparsefast plugin): {path}")
    return out


def start_workers(variants: list[Variant], log_dir: Path, progress=print) -> tuple[dict[str, Worker], dict[str, str]]:
    """Start the workers one after the other, each once the previous one is ready. Returns (ready workers, {name:
    why} of those that failed to load: a peer or a compile that fails is part of the result, not the end of the run).
    On an interrupt, stops those started and re-raises."""
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    try:
        for v in variants:
            t0 = time.perf_counter()
            try:
                workers[v.name] = Worker(v, log_dir / f"{_file_stem(v.name)}.log")
            except (RuntimeError, OSError) as exc:
                failed[v.name] = str(exc)
                progress(f"[setup] {v.name}: FAILED: {exc}")
                continue
            progress(f"[setup] {v.name}: ready in {time.perf_counter() - t0:.1f} s")
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers, failed


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_rounds(workers: dict[str, Worker], prompts: list[list[int]], new_tokens: int, rounds: int,
               progress=print) -> dict[str, dict[str, list]]:
    """{variant: {"b1": [reply per round], "concurrent": [...], "load": [loadavg per round]}}; the order of the
    workers alternates between rounds."""
    raw: dict[str, dict[str, list]] = {name: {"b1": [], "concurrent": [], "load": []} for name in workers}
    names = list(workers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w = workers[name]
            raw[name]["load"].append(list(os.getloadavg()))
            raw[name]["b1"].append(w.ask({"prompts": prompts[:1], "new_tokens": new_tokens}))
            if w.variant.concurrent:
                raw[name]["concurrent"].append(w.ask({"prompts": prompts, "new_tokens": new_tokens}))
            progress(f"[{r}] {name}: {_brief(raw[name])}")
    return raw


def _brief(rows: dict[str, list]) -> str:
    b1 = rows["b1"][-1].get("result", {})
    tpot = b1.get("tpot_s") or (1 / b1["decode_tokens_per_s"] if b1.get("decode_tokens_per_s") else None)
    text = f"b1 TPOT {tpot * 1e3:.1f} ms" if tpot else f"b1 {rows['b1'][-1]}"
    if rows["concurrent"]:
        c = rows["concurrent"][-1].get("result", {})
        text += f", concurrent {c['output_tokens_per_s']:.1f} tok/s" if c else f", {rows['concurrent'][-1]}"
    return text


def kernel_choice_check(workers: dict[str, Worker], quiet: dict[str, list[str]], loads: int) -> dict[str, Any]:
    """For each sparse sparsefast checkpoint x dtype (one worker each): `loads` timed swaps in that worker, compared
    with `quiet` ({variant name: layers swapped by a swap before any load was added})."""
    out: dict[str, Any] = {}
    for name, ref in quiet.items():
        reply = workers[name].ask({"op": "choices", "loads": loads}, timeout_s=3600)
        runs = reply.get("result", {}).get("swapped_per_load")
        if runs is None:
            out[name] = {"error": reply.get("error")}
            continue
        out[name] = {"quiet": len(ref), "under_test": [len(r) for r in runs],
                     "stable": all(set(r) == set(ref) for r in runs),
                     "differing_layers": sorted(set().union(*(set(r) ^ set(ref) for r in runs)))}
    return out


def work_directory(path: str | None) -> tuple[Path, bool]:
    """(directory, made here): the given one or a new temporary one (removed by the caller)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="sparsefast-bench-decode-")), True
    return Path(path), False


def prepare_checkpoints(cfg: DecodeBenchConfig, work: Path, progress=print) -> tuple[dict[str, str], dict[str, str]]:
    """({sparsity: checkpoint dir}, {gguf type: file}): the dense model as loaded, and each sparse variant pruned
    from it (Wanda: 32 samples x 512 tokens of the bundled C4 sample, seed 0; or magnitude), saved under `work`
    unless cfg.checkpoints names one; GGUF files of the dense model when llama.cpp runs. Random-weight models
    (sparsefast.bench.shapes) are magnitude-pruned (Wanda needs text), saved with a word-level tokenizer of their ids
    and get no GGUF."""
    import torch

    from sparsefast.api import load, prune
    from sparsefast.bench.shapes import RANDOM_MODELS, build_model
    from sparsefast.checkpoint import save_checkpoint
    from sparsefast.config import MagnitudeConfig, WandaConfig

    random = cfg.model in RANDOM_MODELS
    needed = [s for s in dict.fromkeys(map(checkpoint_name, cfg.sparsities)) if s not in cfg.checkpoints]
    gguf_types = cfg.gguf_types if cfg.llama_cpp_python and not random else ()
    out = dict(cfg.checkpoints)
    if not needed and not gguf_types:
        return out, {}

    def fresh():
        if random:
            model = build_model(cfg.model, cfg.layers or 2, torch.device("cpu"))[0].float()
            return model, _id_tokenizer(RANDOM_MODELS[cfg.model])
        return load(cfg.model)

    ggufs: dict[str, str] = {}
    int8 = {"quantize": "int8", "lm_head": "int8"}  # the head too since 2026-12-06 21:00: older ones are not reused
    reports = {s: {"bench": "decode", "model": cfg.model, "sparsity": s, "pruner": None if SPARSITIES[s] is None
                   else "magnitude" if random else cfg.pruner, **(int8 if is_int8(s) else {})} for s in needed}
    for sparsity in needed:  # a run with --warm-only before this one, in the same --work-dir, made these already
        path = work / f"ckpt-{_file_stem(sparsity)}"
        if _made_here(path, reports[sparsity]):
            out[sparsity] = str(path)
            progress(f"[setup] {sparsity}: {path} (made by an earlier run in this work directory)")
    for outtype in gguf_types:
        path = work / f"model-{outtype}.gguf"
        if _gguf_made_here(path, cfg.model):
            ggufs[outtype] = str(path)
            progress(f"[setup] {path} (made by an earlier run in this work directory)")
    todo = [s for s in needed if s not in out]
    if not todo and len(ggufs) == len(gguf_types):
        return out, ggufs
    model, tok = fresh()
    if len(ggufs) < len(gguf_types):
        from sparsefast.export.gguf import export_gguf

        for outtype in (t for t in gguf_types if t not in ggufs):
            ggufs[outtype] = str(export_gguf(model, tok, work / f"model-{outtype}.gguf", outtype=outtype,
                                             name=cfg.model))
            progress(f"[setup] wrote {ggufs[outtype]}")
    pristine = True  # `model` is still the model as loaded (what "dense" saves)
    for sparsity in todo:
        pattern, quantize = SPARSITIES[sparsity], "int8" if is_int8(sparsity) else None
        if not pristine:
            model, tok = fresh()
        pristine = pattern is None and quantize is None
        if pattern is None and quantize:  # quantized, not pruned
            prune(model, MagnitudeConfig(pattern="unstructured", sparsity=0.0, quantize=quantize, device="cpu"),
                  progress=False)
        elif pattern is not None:
            if cfg.pruner == "wanda" and not random:
                from sparsefast.data import get_calibration

                calib = get_calibration("c4", tok, 32, 512, seed=0)
                prune(model, WandaConfig(pattern=pattern, nsamples=32, seqlen=512, quantize=quantize), calib,
                      progress=False)
            else:
                prune(model, MagnitudeConfig(pattern=pattern, quantize=quantize, device="cpu"), progress=False)
        path = work / f"ckpt-{_file_stem(sparsity)}"
        # a checkpoint this benchmark made with other settings (an older run's) is replaced; anything else is refused
        out[sparsity] = str(save_checkpoint(model, tok, path, reports[sparsity], overwrite=_made_here(
            path, {"bench": "decode", "model": cfg.model, "sparsity": sparsity})))
        progress(f"[setup] {sparsity}: {out[sparsity]}")
    return out, ggufs


def _made_here(path: Path, report: dict) -> bool:
    """Whether `path` is a checkpoint this benchmark saved with `report` (same model, sparsity and pruner)."""
    from sparsefast.checkpoint import load_report

    try:
        saved = load_report(path)
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in report.items())


def _gguf_made_here(path: Path, model: str) -> bool:
    """Whether `path` is a GGUF file sparsefast exported from `model` (its general.name)."""
    from sparsefast.export.gguf import is_sparsefast_gguf

    if not path.is_file() or not is_sparsefast_gguf(path):
        return False
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.name")
    return field is not None and field.contents() == model


def run_decode_bench(cfg: DecodeBenchConfig, progress=print) -> dict[str, Any] | None:
    """Set up every worker, run cfg.rounds interleaved rounds, summarize (sparsefast.bench.decode_report) and write
    the result JSON (cfg.json_path, else <date>-<device>-decode-<model>[-busy].json in cfg.out_dir or bench/results;
    an existing file only with cfg.overwrite, checked before any work) and its plot beside it (.png). warm_only: set
    up every worker (fills the inductor and calibration caches), then stop; nothing is written. Returns the result
    (None with warm_only)."""
    import shutil

    import torch

    from sparsefast.bench.decode_report import plot, summarize
    from sparsefast.bench.memory import memory_bandwidth
    from sparsefast.bench.results import result_path, run_metadata
    from sparsefast.checkpoint import check_output_file, write_json

    what = f"decode-{Path(cfg.model).name}" + ("-busy" if cfg.busy_core is not None else "")
    out_path = Path(cfg.json_path or result_path(what, device=cfg.device, out_dir=cfg.out_dir))
    plot_path = out_path.with_suffix(".png")
    if not cfg.warm_only:  # before any work: an unwritable result wastes the run
        check_output_file(out_path, overwrite=cfg.overwrite)
        check_output_file(plot_path, overwrite=cfg.overwrite)
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("the decode benchmark plots its result: install matplotlib (pip install matplotlib, or "
                             "the dev extra)")
    work, made = work_directory(cfg.work_dir)
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.engine_threads)
    try:
        ckpts, ggufs = prepare_checkpoints(cfg, work, progress)
        variants = sparsefast_variants(cfg, ckpts)
        variants += peer_variants(cfg, ggufs, ckpts.get("dense"), export_for_vllm(cfg, ckpts, work, progress))
        refs = _one_per_checkpoint(variants) if cfg.choice_loads else {}
        quiet = {}
        if cfg.busy_core is not None:  # the reference choice: a timed swap before the busy loop starts
            for name, v in refs.items():
                w = Worker(v, work / f"quiet-{_file_stem(name)}.log")
                quiet[name] = w.ready["swapped"]
                w.close()
        metadata = run_metadata(cfg.device)
        # vLLM's engine processes keep about 0.7 of a core busy while idle (seen with ps on the 2-core Xeon), which
        # slows every other worker's OpenMP regions: they load and run in a phase of their own, after the others
        phases = [[v for v in variants if v.kind != "vllm"], [v for v in variants if v.kind == "vllm"]]
        with BusyCore(cfg.busy_core):
            bw_before = memory_bandwidth(device)
            workers, failed, raw, choice = {}, {}, {}, {}
            for phase, members in enumerate(phases):
                if not members:
                    continue
                started, why = start_workers(members, work, progress)
                workers.update(started)
                failed.update(why)
                try:
                    if cfg.warm_only:
                        continue
                    if phase == 0:
                        choice = kernel_choice_check(started, quiet or {n: started[n].ready["swapped"] for n in refs
                                                                        if n in started}, cfg.choice_loads)
                    raw.update(run_rounds(started, _prompts(cfg, ckpts), cfg.new_tokens, cfg.rounds, progress))
                finally:
                    for w in started.values():
                        w.close()
            if cfg.warm_only:
                return None
            bw_after = memory_bandwidth(device)
        bandwidth = {"copy_gbs": max(bw_before["copy_gbs"], bw_after["copy_gbs"]), "before": bw_before,
                     "after": bw_after}
        readies = {n: w.ready for n, w in workers.items()}
        result = {"what": "decode", "metadata": metadata, "load_average_after": list(os.getloadavg()),
                  "busy_core": cfg.busy_core, "threads": cfg.engine_threads,
                  "conditions": {k: v for k, v in vars(cfg).items() if k not in ("work_dir", "json_path", "out_dir")},
                  "memory_bandwidth": bandwidth, "workers": readies, "failed": failed, "kernel_choice": choice,
                  **summarize([v for v in variants if v.name in workers], raw, readies, bandwidth, cfg.concurrency),
                  "raw": raw}
        write_json(out_path, result, overwrite=cfg.overwrite)
        progress(f"wrote {out_path}")
        if any(s.get("b1_tokens_per_s") for s in result["variants"].values()):
            progress(f"wrote {plot(result, plot_path, overwrite=cfg.overwrite)}")
        return result
    finally:
        if made:
            shutil.rmtree(work, ignore_errors=True)


def _prompts(cfg: DecodeBenchConfig, checkpoints: dict[str, str]) -> list[list[int]]:
    """cfg.concurrency random prompts of cfg.prompt_len ids (seed 0) from the model's vocabulary."""
    import torch

    with open(Path(next(iter(checkpoints.values()))) / "config.json") as f:
        vocab = int(json.load(f)["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (cfg.prompt_len,), generator=gen).tolist() for _ in range(cfg.concurrency)]


def _id_tokenizer(config: dict[str, Any]) -> Any:
    """A word-level tokenizer over a random model's vocabulary ("t0" .. "t{V-1}"): saved with its checkpoint so it
    loads like any other (the workers feed token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))


def _one_per_checkpoint(variants: list[Variant]) -> dict[str, Variant]:
    """The first sparsefast variant of each sparse checkpoint x dtype (their swaps are the same whatever the compile
    mode), by name."""
    seen: dict[tuple[str, str], Variant] = {}
    for v in variants:
        if v.kind == "sparsefast" and SPARSITIES[v.sparsity] is not None:
            seen.setdefault((v.sparsity, v.precision), v)
    return {v.name: v for v in seen.values()}
