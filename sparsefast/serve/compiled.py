"""The decode step without per-op overhead: gpt-fast's recipe (static KV cache shapes, the step captured once and
replayed) applied to `LlamaBatchRunner`.

A decode step of a small model is hundreds of small ops (SmolLM2-135M: 30 layers x ~15 ops + 211 linears); run
eagerly, each pays Python and dispatcher time, which on a CPU is a large share of a step that should only be the
time to read the weights once. `CompiledRunner` runs the runner's tensor-only step (`LlamaBatchRunner.decode_static`)
through `torch.compile` with inductor: C++/OpenMP kernels on CPU, the whole step replayed as CUDA graphs on CUDA
(inductor's `triton.cudagraphs`, what mode="reduce-overhead" sets). Design:

* One graph for the whole step, `fullgraph=True`: a graph break is an error at load, never a silent slow path. The
  sparse linears stay inside it: their CPU ops (torch.ops.sparsefast.*_cpu) and the CUDA 2:4 op are registered
  with fake kernels, and each SparseLinear's route (kernel or dense for this M) is decided by one eager call
  before the capture, so tracing reads it instead of timing or loading anything.
* Static shapes: a batch of B requests is padded to its bucket, the smallest of 1, 2, 4, ... (capped at
  max_batch, which is always a bucket) that holds it, so continuous batching never compiles while serving: one
  graph per bucket, all compiled at load (`compile_seconds` says how long). Padding rows feed token 0 at position 0
  of the cache's spare row, which no request owns; their logits are dropped.
* Keys read per step: on CPU each row's own keys, up to its position, read in place by the decode-attention kernel
  (sparsefast.ops.attention_cpu; no mask, every shape static); on CPU without the kernel the L = longest position
  + 1 keys that exist, L a dynamic dimension of the mask (one graph for every length); on CUDA every max_model_len
  keys, masked (CUDA graphs replay fixed shapes: gpt-fast's full-cache mask).
* On CPU the step's calls come from a C++ wrapper (inductor's cpp_wrapper, kernels and wrapper built as separate
  objects). Inductor's Python wrapper calls each of the step's ~300 kernels and ops from Python: profiled on a
  2-core Xeon (SmolLM2 bf16 2:4), the graph's own time outside every kernel was 2.4-2.9 ms of a 12.6 ms step, 1.5 ms
  with the C++ wrapper; through the engine the step went 10.2 -> 9.2 ms at batch 1 and 23.9 -> 22.4 ms at 8
  concurrent (bench/results/2026-12-07-cpu-compiled-step-cpp-wrapper-ab.txt). It costs compile time once: 123 s
  for SmolLM2's 4 buckets against 100 s (305 s when the wrapper and kernels are one object).
* Prefill stays eager: it runs once per request, its matmuls are compute-bound, and its shapes vary per prompt
  (72% of an 8 x 128-token fp32 SmolLM2 prefill is matmul; compiled with dynamic shapes it ran 1.05-1.17x faster for
  94 s more cold compile: bench/results/2026-12-07-cpu-prefill-profile-compile.txt).
* The compiled kernels are cached on disk by inductor's FX graph cache (`inductor_cache_dir()`: TORCHINDUCTOR_CACHE_DIR,
  else inductor's default under the temp directory), so a second load of the same model compiles in seconds. That
  key is the graph, which names our ops but not their schemas: after an upgrade that changed a schema, a graph of the
  same calls would load an artifact whose C++ wrapper calls the op with the old argument list (it happened when the
  linear ops gained `int8_activations`: "aoti_torch_call_dispatcher ... failed"). So a CompiledRunner extends
  torch.compiler.config.cache_key_tag, process-wide (every compile and cache lookup of the step sees one tag) and
  before its first compile, by a hash of every registered sparsefast schema (`ops_cache_tag`).
  The ops' arguments have no defaults either: inductor's C++ wrapper drops a defaulted bool from the calls it
  generates (torch 2.13).

Greedy output equals the eager step's token for token on the test models (tests/serve/test_compiled.py). What the
compiled step is worth is measured by `sparsefast bench decode` (bench/RESULTS.md, "Decode side by side"): on a 2-core
CPU it cut the batch-1 step by 1.2-1.5x and a step of 8 concurrent requests by 1.2x (README, "Serve a pruned
model"), but a first load compiles for minutes, so `serve` and `generate` default to --compile off.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI parsers take COMPILE_MODES from here without torch
    import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes of the compiled step: powers of two below max_batch, then max_batch."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `batch` rows."""
    for size in buckets:
        if batch <= size:
            return size
    raise ValueError(f"batch of {batch} exceeds the largest bucket {buckets[-1]}")


def inductor_cache_dir() -> str:
    """Where inductor keeps its compiled kernels and FX graph cache (TORCHINDUCTOR_CACHE_DIR, else its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.abspath(cache_dir())


def ops_cache_tag() -> str:
    """torch.compiler's cache_key_tag ($TORCH_COMPILE_CACHE_KEY_TAG, if any) + a hash of the schemas of every
    registered sparsefast op (once: a tag that has it is returned as it is): compiled steps are cached per version of
    our ops' signatures."""
    import hashlib

    import torch
    import torch.compiler.config

    schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("sparsefast::"))
    ours = "sparsefast-ops-" + hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]
    tag = torch.compiler.config.cache_key_tag
    return tag if ours in tag.split("+") else "+".join(t for t in (tag, ours) if t)


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


class CompiledRunner:
    """A `LlamaBatchRunner` (built with spare_row=True when max_batch > 1) whose decode runs the compiled step; prefill,
    release and copy_slot are the runner's own.

    Args: runner; max_batch: its slot count (the largest bucket); max_len: positions per slot. Construction compiles
    every bucket (raises what torch.compile raised; the engine decides whether that falls back to eager).
    Attributes: compile_seconds {bucket: seconds}, graphs (graphs inductor compiled: one per bucket; a later
    recompile would show here), cache_dir.
    """

    def __init__(self, runner: Any, max_batch: int, max_len: int) -> None:
        self.runner, self.max_len = runner, max_len
        self.device = runner.device
        self.buckets = batch_buckets(max_batch)
        if self.buckets[-1] > 1 and runner.cache.spare_row_index is None:
            raise ValueError("CompiledRunner: the runner's cache needs a spare row for padding (spare_row=True)")
        self.spare_slot = runner.cache.spare_row_index
        self.graphs = 0
        self.cache_dir = inductor_cache_dir()
        import torch
        import torch.compiler.config

        torch.compiler.config.cache_key_tag = ops_cache_tag()  # process-wide (module docstring: why)
        # No guards on the model's modules: the model is fixed once the engine holds it (its linears' routes for
        # each bucket are decided before capture), and checking their attributes before every step cost ~1 ms of a
        # 15 ms bf16 SmolLM2 step on a 2-core Xeon (ad-hoc, 4 x 64 tokens each way). The inputs' shapes are still
        # guarded, which is what tells the buckets' graphs apart.
        self._step = torch.compile(runner.decode_static, backend=self._backend, fullgraph=True, dynamic=False,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.compile_seconds = self._compile_buckets()

    # the runner interface the engine calls ------------------------------------------------------------------------
    def prefill(self, slots: list[int], prompts: list[list[int]], *,
                all_positions: bool = False) -> torch.Tensor | list[torch.Tensor]:
        return self.runner.prefill(slots, prompts, all_positions=all_positions)

    def release(self, slot: int) -> None:
        self.runner.release(slot)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.runner.copy_slot(src, dst, length)

    @property
    def cache(self):
        return self.runner.cache

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per slot (ids[b] at positions[b]), through the compiled step of B's bucket; logits
        [B, vocab]."""
        logits = self._step(*self.step_inputs(slots, ids, positions))[:len(slots)]
        # a CUDA graph's output buffer is overwritten by its next replay: the caller gets its own copy
        return logits.clone() if self.device.type == "cuda" else logits

    # ------------------------------------------------------------------------------------------------------------------
    def step_inputs(self, slots: list[int], ids: list[int],
                    positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids [P, 1], positions [P, 1], slots [P], mask [P, 1, 1, L] or None) of `decode_static` for the batch
        padded to its bucket P."""
        import torch

        pad = bucket_for(len(slots), self.buckets) - len(slots)
        dev = self.device
        ids_t = torch.tensor(ids + [0] * pad, device=dev)[:, None]
        pos_t = torch.tensor(positions + [0] * pad, device=dev)[:, None]
        slots_t = torch.tensor(slots + [self.spare_slot] * pad, device=dev)
        if self.runner.decode_kernel:  # the CPU attention kernel reads each row up to its position: no mask
            return ids_t, pos_t, slots_t, None
        length = self.max_len if dev.type == "cuda" else max(positions) + 1
        mask = (torch.arange(length, device=dev)[None, :] <= pos_t).view(len(slots_t), 1, 1, length)
        if dev.type != "cuda":
            torch._dynamo.mark_dynamic(mask, 3)
        return ids_t, pos_t, slots_t, mask

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        """inductor, counting the graphs it compiles; CUDA graphs on CUDA (mode="reduce-overhead"), its C++ wrapper
        on CPU. Low-precision intermediates are rounded where eager rounds them (emulate_precision_casts): otherwise a
        fused bf16 RMSNorm keeps fp32 where the eager step rounds to bf16, and greedy bf16 output drifts from the
        eager step's."""
        import torch._inductor.config
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        patches: dict[str, Any] = {"emulate_precision_casts": True}
        if self.device.type == "cuda":
            patches["triton.cudagraphs"] = True
        elif hasattr(torch._inductor.config, "cpp_wrapper_build_separate"):
            # the step's calls from a C++ wrapper, its kernels and wrapper built as separate objects (module docstring;
            # an inductor without that option keeps its Python wrapper: as one object it compiled ~3x slower)
            patches["cpp_wrapper"] = True
            patches["cpp_wrapper_build_separate"] = True
        return compile_fx(gm, example_inputs, config_patches=patches)

    def _compile_buckets(self) -> dict[int, float]:
        """Compile (or load from the FX graph cache) the step of every bucket. Each bucket runs one eager step first
        so every sparse linear has decided its route for this M (tracing then reads it). The steps write only to the
        spare row, or to slot 0 at position 0 when there is no spare row (max_batch 1: no request holds it yet)."""
        import torch

        seconds: dict[int, float] = {}
        spare = self.spare_slot if self.spare_slot is not None else 0
        with torch.inference_mode():
            for size in self.buckets:
                inputs = self.step_inputs([spare] * size, [0] * size, [1] * size)
                self.runner.decode_static(*inputs)
                t0 = time.perf_counter()
                self._step(*inputs)
                seconds[size] = time.perf_counter() - t0
        log.info("compiled the decode step for batch buckets %s in %.1f s (inductor cache: %s)",
                 list(self.buckets), sum(seconds.values()), self.cache_dir)
        return seconds
