"""`DecodeBenchConfig`, the settings of `sparsefast bench decode` and bench/e2e/bench_decode.py (valid by
construction, every check before any work), and the one parser both use. Imports no torch.

Examples:
  # the committed CPU run, on a quiet machine (peer venvs from bench/peers/llama_cpp.sh and vllm_cpu.sh); once
  # with --warm-only first, so the measured run finds the compiled steps in the inductor cache
  sparsefast bench decode --llama-cpp ../peers/llama-cpp --vllm ../peers/vllm-cpu
  # sparse + int8 against llama.cpp's 8- and 4-bit files (issue 24)
  sparsefast bench decode --llama-cpp ../peers/llama-cpp --variants dense,dense-int8,2:4,2:4-int8,50%,50%-int8 \
      --dtypes float32 --compile on --gguf-types f32,q8_0,q4_1
  # ... and the same int8 checkpoints with int8 activations too (dynamic W8A8, serve --int8-activations)
  sparsefast bench decode --llama-cpp ../peers/llama-cpp --variants dense-int8,dense-w8a8,2:4-int8,2:4-w8a8,50%-int8,\
50%-w8a8 --dtypes float32 --compile on --gguf-types q8_0,q4_1
  # under load: a process spinning on core 1 throughout, the kernel choice checked in 3 more timed swaps
  sparsefast bench decode --busy-core 1 --dtypes float32
  # the harness in a minute or two (tiny random model; its timings mean nothing)
  sparsefast bench decode --dry-run
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace

# variant name -> prune pattern. "dense" runs sparsefast's dense CPU kernel for few tokens (sparsify_ mode auto, what
# serve and generate do by default); "dense-torch" is the same dense checkpoint with torch's F.linear everywhere
# (mode off): what the kernel adds. A name ending in INT8_SUFFIX is the same model quantized too (`prune --quantize
# int8`: per-row int8 weights, read as int8 by the CPU kernels; "dense-int8" is quantized without pruning). A name
# ending in W8A8_SUFFIX runs the -int8 checkpoint with int8 activations too (SparsifyConfig.int8_activations).
INT8_SUFFIX = "-int8"
W8A8_SUFFIX = "-w8a8"
SPARSITIES = {"dense": None, "dense-torch": None, "2:4": "2:4", "50%": "unstructured",
              "dense-int8": None, "2:4-int8": "2:4", "50%-int8": "unstructured",
              "dense-w8a8": None, "2:4-w8a8": "2:4", "50%-w8a8": "unstructured"}
DEFAULT_VARIANTS = ("dense", "dense-torch", "2:4", "50%")
GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_1")
DEFAULT_GGUF_TYPES = ("f32", "bf16", "q8_0")
DTYPES = ("float32", "bfloat16")


def checkpoint_name(variant: str) -> str:
    """The checkpoint a variant runs: "dense" for both float dense variants, the -int8 one for a -w8a8 variant, else
    its own."""
    if variant == "dense-torch":
        return "dense"
    return variant.removesuffix(W8A8_SUFFIX) + INT8_SUFFIX if int8_activations(variant) else variant


def is_int8(variant: str) -> bool:
    """Whether a variant's weights are int8-quantized."""
    return variant.endswith(INT8_SUFFIX) or int8_activations(variant)


def int8_activations(variant: str) -> bool:
    """Whether a variant quantizes its activations to int8 too."""
    return variant.endswith(W8A8_SUFFIX)


def _choices(name: str, values: tuple[str, ...], allowed) -> None:
    wrong = [v for v in values if v not in allowed]
    if wrong or not values:
        raise ValueError(f"--{name} takes a comma list of {', '.join(allowed)}; got {','.join(values) or 'none'}")


@dataclass(frozen=True)
class DecodeBenchConfig:
    """What sparsefast.bench.decode_run.run_decode_bench measures (the options of the same names, below)."""

    model: str = "smollm2"
    layers: int | None = None  # decoder layers of a *-random model
    sparsities: tuple[str, ...] = DEFAULT_VARIANTS
    dtypes: tuple[str, ...] = DTYPES
    compile_modes: tuple[str, ...] = ("on", "off")
    pruner: str = "wanda"
    checkpoints: dict[str, str] = field(default_factory=dict)
    llama_cpp_python: str | None = None
    gguf_types: tuple[str, ...] = DEFAULT_GGUF_TYPES
    vllm_python: str | None = None
    device: str = "cpu"
    concurrency: int = 8
    prompt_len: int = 32
    new_tokens: int = 64
    rounds: int = 4
    threads: int | None = None  # None: every core this process may use
    busy_core: int | None = None
    choice_loads: int = 0
    work_dir: str | None = None
    json_path: str | None = None
    out_dir: str | None = None
    overwrite: bool = False
    warm_only: bool = False

    def __post_init__(self) -> None:
        _choices("variants", self.sparsities, list(SPARSITIES))
        _choices("dtypes", self.dtypes, DTYPES)
        _choices("compile", self.compile_modes, ("on", "off"))
        _choices("gguf-types", self.gguf_types, GGUF_TYPES)
        if self.pruner not in ("wanda", "magnitude"):
            raise ValueError(f"--pruner must be wanda or magnitude, got {self.pruner!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and (self.llama_cpp_python or self.vllm_python or self.busy_core is not None):
            raise ValueError("--llama-cpp, --vllm and --busy-core are CPU measurements; drop them with --device cuda")
        for sparsity, path in self.checkpoints.items():
            if sparsity not in SPARSITIES or sparsity != checkpoint_name(sparsity):
                raise ValueError(f"--checkpoint {sparsity}=...: the name must be one of "
                                 f"{', '.join(s for s in SPARSITIES if s == checkpoint_name(s))}")
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"--checkpoint {sparsity}={path}: not a checkpoint directory (no config.json)")
        for python in (self.llama_cpp_python, self.vllm_python):
            if python is not None and not os.access(python, os.X_OK):
                raise ValueError(f"{python} is not an executable python; give the peer venv (bench/peers/"
                                 "llama_cpp.sh and vllm_cpu.sh make them)")
        for name, value, low in (("concurrency", self.concurrency, 2), ("prompt-len", self.prompt_len, 1),
                                 ("new-tokens", self.new_tokens, 2), ("rounds", self.rounds, 1),
                                 ("threads", self.threads or 1, 1), ("choice-loads", self.choice_loads, 0),
                                 ("layers", self.layers or 1, 1)):
            if value < low:
                raise ValueError(f"--{name} must be >= {low}, got {value}")
        if self.busy_core is not None and self.busy_core not in os.sched_getaffinity(0):
            raise ValueError(f"--busy-core {self.busy_core} is not a core this process may run on "
                             f"({sorted(os.sched_getaffinity(0))})")
        if self.work_dir is not None and not os.path.isdir(self.work_dir):
            raise ValueError(f"--work-dir {self.work_dir} is not a directory; create it or leave the option out")

    @property
    def engine_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _checkpoint(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (NAME one of {', '.join(SPARSITIES)}), got {text!r}")
    return name, path


def add_decode_arguments(q: argparse.ArgumentParser) -> None:
    q.description = (__doc__ or "") + "\nMeasurements and definitions: sparsefast.bench.decode_run, decode_report."
    q.formatter_class = argparse.RawDescriptionHelpFormatter
    q.add_argument("--model", default="smollm2", help="smollm2 (default), a dense checkpoint, llama-7b-random or "
                                                      "llama-tiny-random (random weights; magnitude-pruned)")
    q.add_argument("--layers", type=int, default=None, help="decoder layers of a *-random model (default 2)")
    q.add_argument("--variants", type=_csv, default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(SPARSITIES)} (default {','.join(DEFAULT_VARIANTS)}; *-int8: "
                        "quantized with prune --quantize int8; *-w8a8: that checkpoint with int8 activations "
                        "too)".replace("%", "%%"))
    q.add_argument("--dtypes", type=_csv, default=DTYPES, help="float32,bfloat16 (default both)")
    q.add_argument("--compile", type=_csv, default=("on", "off"),
                   help="on,off: the compiled and the eager step (default both)")
    q.add_argument("--pruner", default="wanda", choices=("wanda", "magnitude"),
                   help="how the sparse variants are pruned (default wanda: 32 x 512 tokens of the bundled C4 "
                        "sample; the speed depends on the sparsity pattern, not on the method)")
    q.add_argument("--checkpoint", type=_checkpoint, action="append", default=[], metavar="NAME=DIR",
                   help="use this checkpoint for variant NAME instead of pruning it here (repeatable)")
    q.add_argument("--llama-cpp", default=os.environ.get("SPARSEFAST_LLAMA_CPP_VENV"), metavar="VENV",
                   help="venv with llama-cpp-python (bench/peers/llama_cpp.sh): llama.cpp on GGUF exports "
                        "(default $SPARSEFAST_LLAMA_CPP_VENV, else none)")
    q.add_argument("--gguf-types", type=_csv, default=DEFAULT_GGUF_TYPES,
                   help=f"GGUF types llama.cpp runs: {','.join(GGUF_TYPES)} (default {','.join(DEFAULT_GGUF_TYPES)})")
    q.add_argument("--vllm", default=os.environ.get("SPARSEFAST_VLLM_VENV"), metavar="VENV",
                   help="venv with vllm-cpu (bench/peers/vllm_cpu.sh; default $SPARSEFAST_VLLM_VENV, else none)")
    q.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where sparsefast runs (default cpu)")
    q.add_argument("--concurrency", type=int, default=8, help="concurrent requests (default 8)")
    q.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (random ids; default 32)")
    q.add_argument("--new-tokens", type=int, default=64, help="tokens per request, EOS ignored (default 64)")
    q.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    q.add_argument("--threads", type=int, default=None,
                   help="threads of every engine (default: sparsefast's workers each take --threads auto, the cores "
                        "no other process keeps busy, as serve and generate do; the peers get all cores)")
    q.add_argument("--busy-core", type=int, default=None,
                   help="a busy-loop process pinned to this core for the whole run (result name ends in -busy)")
    q.add_argument("--choice-loads", type=int, default=None,
                   help="timed swaps per sparse checkpoint checking the kernel choice is stable (default 3 with "
                        "--busy-core, else 0)")
    q.add_argument("--work-dir", default=None, help="checkpoints, GGUF files and worker logs (default: a temporary "
                                                    "directory, removed at the end)")
    q.add_argument("--json", default=None, help="result file (default <date>-<device>-decode-<model>[-busy].json in "
                                                "--out; refused if it exists, unless --overwrite)")
    q.add_argument("--out", default=None, help="result directory (default bench/results; /tmp with --dry-run)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    q.add_argument("--warm-only", action="store_true",
                   help="set up every worker (compiles the steps into the inductor cache), then stop")
    q.add_argument("--dry-run", action="store_true",
                   help="llama-tiny-random, magnitude, 1 round of 4 tokens, concurrency 3: checks the harness")


def config_from_args(args: argparse.Namespace) -> DecodeBenchConfig:
    """The DecodeBenchConfig of parsed options (raises ValueError for a bad one)."""
    def venv_python(venv: str | None) -> str | None:
        return None if venv is None else os.path.join(venv, "bin", "python")

    cfg = DecodeBenchConfig(
        model=args.model, layers=args.layers, sparsities=args.variants, dtypes=args.dtypes,
        compile_modes=args.compile, pruner=args.pruner, checkpoints=dict(args.checkpoint),
        llama_cpp_python=venv_python(args.llama_cpp), gguf_types=args.gguf_types,
        vllm_python=venv_python(args.vllm), device=args.device, concurrency=args.concurrency,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads,
        busy_core=args.busy_core, choice_loads=args.choice_loads if args.choice_loads is not None else
        (3 if args.busy_core is not None else 0), work_dir=args.work_dir, json_path=args.json, out_dir=args.out,
        overwrite=args.overwrite, warm_only=args.warm_only)
    if not args.dry_run:
        return cfg
    return replace(cfg, model="llama-tiny-random", pruner="magnitude", rounds=1, new_tokens=4, prompt_len=8,
                   concurrency=3, out_dir=args.out or "/tmp")
