"""The public Python surface: `load(path)` → (model, tokenizer), `prune(model, config, calib)` → report,
`check_prunable`, `check_calib`, `evaluate`, and `prune_pretrained` (load → check → calibrate → prune → evaluate →
save, what `sparsefast prune` runs).

A config is valid by construction (sparsefast.config); what is checked here is what needs the model: the pattern
against every prunable linear, seqlen against the context, finite weights, the calibration ids. Each public call
runs those checks once, before any work: `prune` and `prune_pretrained` check, then share `_prune_checked`."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import time
from typing import Any, Sequence

import torch
from torch import nn

import sparsefast
from sparsefast.calibrate import layer_outlier_ratios, prune_layerwise
from sparsefast.config import PruneConfig
from sparsefast.config.prune import FROM_DISK_CHOICES
from sparsefast.device import resolve_device, resolve_dtype
from sparsefast.ops.int8_rows import refuse_quantized
from sparsefast.prune import make_pruner, owl_layer_sparsities, round_linear_int8


def compute_device(name: str) -> torch.device:
    """auto → cuda if available else cpu; cuda without CUDA is a ValueError (checked before any work)."""
    return resolve_device(name)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None, sparse: str = "off",
         int8_activations: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of any checkpoint sparsefast reads or writes: a dense, mask-pruned (sparsefast prune) or
    structurally pruned (prune-structured; structure.json) directory, a `.gguf` file, a hub id or "smollm2".

    The model is a transformers `*ForCausalLM` in eval mode on `device` ("cpu", "cuda", "cuda:N", "auto") that
    `generate()`s. dtype: a torch.dtype or "float32" / "bfloat16" / "float16" / "auto"; None = the checkpoint's
    dtype (half types become float32 on CPU). bfloat16 on CPU halves the weight bytes a token reads: dense matmuls
    run through torch (oneDNN's AVX-512-BF16 / AMX kernels where the CPU has them, its conversion path where not),
    sparse linears through sparsefast's CPU kernels (bf16 values widened to fp32 in registers, fp32 accumulation).
    No pickle is executed and no remote code runs (see sparsefast.models.load_model).

    sparse: "off" (as loaded), "auto" (sparse linears where they are faster: on CPU each linear with >= 30% zeros
    gets the fastest of dense / 2:4 / unstructured as timed on this machine, on CUDA 2:4 linears become
    Sparse24Linear) or "sparse24"; see sparsefast.nn.sparsify_. int8_activations (sparse "auto", an int8 checkpoint
    from prune --quantize int8, CPU): each linear's input quantized to int8 too (SparsifyConfig.int8_activations)."""
    from sparsefast.models import load_model
    from sparsefast.nn import SparsifyConfig, sparsify_

    sparsify = SparsifyConfig(mode=sparse, int8_activations=int8_activations)  # refused before anything is read
    model, tokenizer = load_model(os.fspath(path), dtype=resolve_dtype(dtype), device=device)
    sparsify_(model, sparsify)
    return model, tokenizer


def check_prunable(model: nn.Module, config: PruneConfig, *, check_seqlen: bool = True,
                   check_weights: bool = True) -> Any:
    """Every model-dependent check of `config`, before any work: supported architecture, a float model (not one
    already int8-quantized), the pattern against every prunable linear, finite weights (check_finite_weights names
    the first bad linear; check_weights=False when the layers are still on disk: each is checked as it is read),
    config.seqlen against the model's context (skipped with check_seqlen=False when the caller brings its own
    calibration ids, whose shape check_calib checks), an nn.Linear LM head where config.quantize rounds it. Returns
    the model's adapter."""
    from sparsefast.models import check_finite_weights, get_adapter

    adapter = get_adapter(model)
    refuse_quantized(model, "prune")
    head = adapter.lm_head(model)
    if config.quantize is not None and not isinstance(head, nn.Linear):
        raise ValueError(f"quantize {config.quantize}: the LM head is a {type(head).__name__}, not an nn.Linear, so "
                         "it cannot be quantized per row; prune without quantize")
    linears = {f"layers.{i}.{n}": lin for i, layer in enumerate(adapter.decoder_layers(model))
               for n, lin in adapter.prunable_linears(layer).items()}
    config.check_linears(linears)
    max_ctx = adapter.max_context(model)
    if check_seqlen and config.needs_calibration and max_ctx is not None and config.seqlen > max_ctx:
        raise ValueError(f"seqlen {config.seqlen} exceeds the model's context of {max_ctx} tokens; "
                         f"use --seqlen {max_ctx} or less")
    if check_weights:
        check_finite_weights(model)
    return adapter


def check_calib(model: nn.Module, adapter: Any, calib: Any) -> None:
    """Calibration ids must be a LongTensor [nsamples >= 1, seqlen <= context] of valid token ids."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ValueError(f"calib must be a LongTensor [nsamples, seqlen], got "
                         f"{getattr(calib, 'dtype', type(calib).__name__)} {tuple(getattr(calib, 'shape', ()))}")
    if calib.shape[0] < 1 or calib.shape[1] < 1:
        raise ValueError(f"calib must hold at least one sample of at least one token, got {tuple(calib.shape)}")
    max_ctx = adapter.max_context(model)
    if max_ctx is not None and calib.shape[1] > max_ctx:
        raise ValueError(f"calibration seqlen {calib.shape[1]} exceeds the model's context of {max_ctx} tokens")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(calib.min()) < 0 or int(calib.max()) >= vocab):
        raise ValueError(f"calib holds token ids outside [0, {vocab}): was it tokenized for another model?")


def versions() -> dict[str, str]:
    import transformers

    return {"sparsefast": sparsefast.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def prune(model: nn.Module, config: PruneConfig, calib: torch.Tensor | None = None, *,
          progress: bool = True, offload: bool = True) -> dict[str, Any]:
    """Prune `model` in place with `config` (MagnitudeConfig | WandaConfig | SparseGPTConfig | RIAConfig; any of
    them with allocation="owl" and/or refine="dsnot").

    calib: LongTensor [nsamples, seqlen] of token ids (ignored when config.needs_calibration is False). The model
    may live on CPU while config.device is "cuda": only the current decoder layer and its activations go to the GPU.
    Returns the report written to sparsefast.json: method, pattern, requested and achieved sparsity per linear and
    overall, calibration settings, timings {calib_forward_s, stats_s, metric_mask_s, total_s, per_layer}, damping
    notes (SparseGPT), device, versions. Bad input raises ValueError before any weight is touched.
    """
    adapter = check_prunable(model, config, check_seqlen=False)
    if config.needs_calibration:
        if calib is None:
            why = config.method if config.method_needs_calibration else (
                f"{config.method} with " + ("refine=dsnot" if config.refine else f"allocation={config.allocation}"))
            raise ValueError(f"{why} needs calibration ids: a LongTensor [nsamples, seqlen]")
        check_calib(model, adapter, calib)
    return _prune_checked(model, adapter, config, calib, compute_device(config.device), progress=progress,
                          offload=offload)


def _prune_checked(model: nn.Module, adapter: Any, config: PruneConfig, calib: torch.Tensor | None,
                   device: torch.device, *, progress: bool, offload: bool = True,
                   layer_stream: Any = None) -> dict[str, Any]:
    """`prune` after its checks (check_prunable, check_calib): calibrate, prune layer by layer, build the report.
    layer_stream: the decoder layers come from disk and go back to it (sparsefast.models.streamed)."""
    if resolve_dtype(config.dtype) is not None:
        model.to(resolve_dtype(config.dtype))
    pruner = make_pruner(config)
    t0 = time.perf_counter()
    allocation: dict[str, Any] = {"method": config.allocation}
    extra_timings: dict[str, float] = {}
    layer_sparsity = None
    if config.allocation == "owl":
        ratios = layer_outlier_ratios(model, adapter, calib, m=config.owl_m, device=device,
                                      batch_size=config.batch_size, offload=offload, backend=config.backend,
                                      progress=progress, layer_stream=layer_stream)
        layer_sparsity = owl_layer_sparsities(ratios, config.target_sparsity, config.owl_lambda)
        allocation.update(m=config.owl_m, lam=config.owl_lambda, outlier_ratios=ratios, layer_sparsity=layer_sparsity)
        extra_timings["owl_outlier_pass_s"] = time.perf_counter() - t0
    result = prune_layerwise(model, adapter, pruner, calib if config.needs_calibration else None, device=device,
                             batch_size=config.batch_size, offload=offload, progress=progress,
                             layer_sparsity=layer_sparsity, layer_stream=layer_stream)
    head_stats = round_linear_int8(adapter.lm_head(model)) if config.quantize is not None else None
    wall = time.perf_counter() - t0
    linears = result["linears"]
    numel = sum(s["numel"] for s in linears.values())
    zeros = sum(s["zeros"] for s in linears.values())
    report: dict[str, Any] = {
        "method": config.method,
        "pattern": str(config.parsed_pattern),
        "requested_sparsity": config.target_sparsity,
        "achieved_sparsity": zeros / max(numel, 1),
        "prunable_params": numel,
        "zeros": zeros,
        "config": config.to_dict(),
        "allocation": allocation,
        "calibration": None if not config.needs_calibration else {
            "source": config.calib, "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
            "seed": config.seed, "batch_size": config.batch_size},
        "timings": {**result["timings"], **extra_timings, "wall_s": wall},
        "linears": linears,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
    }
    if head_stats is not None:
        report["lm_head_quantize"] = head_stats
    damping = {name: s["damping"] for name, s in linears.items() if "damping" in s}
    if damping:
        raised = {n: d for n, d in damping.items() if d["retries"]}
        report["damping"] = {"percdamp": getattr(config, "percdamp", None), "raised": raised,
                             "note": f"damping raised on {len(raised)} of {len(damping)} linears"}
    return report


def evaluate(model: nn.Module, tokenizer: Any, datasets: Sequence[str], *, seqlen: int, protocol: str = "gptq",
             data_dir: str | None = None, device: str = "cpu", max_windows: int | None = None,
             progress: bool = True) -> dict:
    """Perplexity on `datasets` (wikitext2, ptb, c4) per sparsefast.eval.perplexity (first `max_windows` windows
    only, if given)."""
    from sparsefast.eval.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, list(datasets), seqlen=seqlen, protocol=protocol,
                               data_dir=data_dir, device=str(compute_device(device)), max_windows=max_windows,
                               progress=progress)


FROM_DISK_AUTO_FRACTION = 0.5  # auto streams a model whose weights take more than this share of the free memory


def from_disk_plan(model_name: str, from_disk: str, *, dtype: torch.dtype | None, needs_whole: str | None,
                   log) -> Any:
    """The StreamPlan (sparsefast.models.streamed) to prune from disk, or None to load the model whole. "on" raises
    ValueError, before any work, when streaming cannot serve the request (the reason and the fix; `needs_whole`:
    why the request itself needs the whole model, or None); "auto" streams a local safetensors checkpoint whose
    weights take more than half the available memory when nothing needs the model whole, and otherwise (saying why
    when the size called for it) loads it whole."""
    from sparsefast.device import available_memory_bytes
    from sparsefast.models.safetensors_stream import checkpoint_files
    from sparsefast.models.streamed import plan_streamed, streamable_dir

    if from_disk not in FROM_DISK_CHOICES:
        raise ValueError(f"from_disk must be one of {', '.join(FROM_DISK_CHOICES)}, got {from_disk!r}")
    if from_disk == "off":
        return None
    directory, why_not = streamable_dir(model_name)
    why_not = why_not or needs_whole
    if from_disk == "on" and why_not is not None:
        raise ValueError(f"--from-disk on: {model_name}: {why_not}")
    if from_disk == "on":
        return plan_streamed(directory, dtype)
    if directory is None:  # not a local safetensors checkpoint: nothing to stream from
        return None
    free = available_memory_bytes()
    files = sum(f.stat().st_size for f in checkpoint_files(directory))
    if why_not is not None:
        if free is not None and files > FROM_DISK_AUTO_FRACTION * free:
            log(f"loading the model whole although its files take {files / 2**30:.1f} GiB of the "
                f"{free / 2**30:.1f} GiB available: {why_not}")
        return None
    # loading casts half-precision files to float32 at most: files this small fit whatever the dtype, unplanned
    if free is None or 2 * files <= FROM_DISK_AUTO_FRACTION * free:
        return None
    try:
        plan = plan_streamed(directory, dtype)
    except ValueError as exc:
        plan, reason = None, exc
    # the size in the model's dtype when the plan is known, else the files' (then only to say why it is loaded whole)
    need = plan.weight_bytes if plan is not None else files
    if need <= FROM_DISK_AUTO_FRACTION * free:
        return None
    if plan is None:
        log(f"not pruning from disk although the model takes {need / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB "
            f"available: {reason}")
        return None
    log(f"pruning from disk: the model's weights take {need / 2**30:.1f} GiB, more than half of the "
        f"{free / 2**30:.1f} GiB available (--from-disk off loads it whole)")
    return plan


def prune_pretrained(model_name: str, config: PruneConfig, *, out: str | None = None, overwrite: bool = False,
                     data_dir: str | None = None, eval_datasets: Sequence[str] = (), eval_seqlen: int | None = None,
                     eval_windows: int | None = None, progress: bool = True, from_disk: str = "auto",
                     log=print) -> dict[str, Any]:
    """Load `model_name` (HF dir, hub id, .gguf or a registered name), prune it, optionally evaluate perplexity
    before and after, and save it atomically to `out`. Every bad input raises before any file is written.

    from_disk: "on" prunes a local safetensors checkpoint layer by layer from disk, writing each pruned layer to
    `out` as it finishes (peak memory about one decoder layer plus the calibration activations; the result is the
    fully-loaded one, byte for byte: sparsefast.models.streamed); "off" loads the model whole; "auto" (default)
    streams when the model would take more than half the available memory and nothing asked needs it whole. From
    disk, the weights are checked finite by one read pass before any file is written."""
    from sparsefast.checkpoint import OutputClaim, check_savable, save_checkpoint
    from sparsefast.data import check_data_dir, check_eval_request
    from sparsefast.models import load_config, load_model, local_source_paths

    device = compute_device(config.device)
    sources = local_source_paths(model_name)
    check_data_dir(data_dir)
    for name in eval_datasets:
        check_eval_request(name)
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {eval_windows}")
    if eval_seqlen is not None and eval_seqlen < 1:
        raise ValueError(f"--eval-seqlen must be >= 1, got {eval_seqlen}")
    needs_whole = ("it writes each pruned layer as it goes: give --out DIR" if out is None
                   else "the model is never whole in memory, so --eval cannot run: prune, then `sparsefast eval OUT`"
                   if eval_datasets else "--quantize rounds the LM head after the layers: prune with --from-disk off"
                   if config.quantize is not None else None)
    plan = from_disk_plan(model_name, from_disk, dtype=resolve_dtype(config.dtype), needs_whole=needs_whole, log=log)
    load_config(model_name)  # missing path / unsupported architecture, before loading any weights
    # `out` is checked and claimed here and held until the save: a second run on the same `out` stops now, before
    # any work (sparsefast.checkpoint.OutputClaim)
    claim = OutputClaim(out, overwrite, sources=sources) if out is not None else None
    with claim or contextlib.nullcontext():
        if plan is not None:
            return _prune_from_disk(model_name, plan, config, claim, device, data_dir=data_dir, progress=progress,
                                    log=log)
        model, tokenizer = load_model(model_name, dtype=resolve_dtype(config.dtype), device="cpu")
        adapter = check_prunable(model, config)
        if out is not None:
            check_savable(model)
        ev_seqlen = eval_seqlen or min(config.seqlen, adapter.max_context(model) or config.seqlen)
        calib = _calibration_ids(model, adapter, tokenizer, config, data_dir)
        before = None
        if eval_datasets:
            before = evaluate(model, tokenizer, eval_datasets, seqlen=ev_seqlen, data_dir=data_dir,
                              device=config.device, max_windows=eval_windows, progress=progress)
            log(f"perplexity before pruning: {_fmt_ppl(before)}")
        report = _prune_checked(model, adapter, config, calib, device, progress=progress)
        report["model"] = model_name
        _log_pruned(report, log)
        if eval_datasets:
            after = evaluate(model, tokenizer, eval_datasets, seqlen=ev_seqlen, data_dir=data_dir,
                             device=config.device, max_windows=eval_windows, progress=progress)
            log(f"perplexity after pruning:  {_fmt_ppl(after)}")
            report["eval"] = {"seqlen": ev_seqlen, "protocol": "gptq", "max_windows": eval_windows,
                              "before": before, "after": after}
        if claim is not None:
            log(f"saved {save_checkpoint(model, tokenizer, claim, report)}")
    return report


def _calibration_ids(model: nn.Module, adapter: Any, tokenizer: Any, config: PruneConfig,
                     data_dir: str | None) -> torch.Tensor | None:
    """The checked calibration ids of `config`, or None when nothing needs them."""
    from sparsefast.data import get_calibration

    if not config.needs_calibration:
        return None
    calib = get_calibration(config.calib, tokenizer, config.nsamples, config.seqlen, seed=config.seed,
                            data_dir=data_dir)
    check_calib(model, adapter, calib)
    return calib


def _log_pruned(report: dict, log) -> None:
    timings = report["timings"]
    log(f"pruned {report['method']} {report['pattern']}: achieved sparsity {report['achieved_sparsity']:.4f} in "
        f"{timings['total_s']:.1f} s (calibration forward {timings['calib_forward_s']:.1f} s, metric+mask "
        f"{timings['metric_mask_s']:.1f} s)")


def _prune_from_disk(model_name: str, plan: Any, config: PruneConfig, claim: Any, device: torch.device, *,
                     data_dir: str | None, progress: bool, log) -> dict[str, Any]:
    """prune_pretrained from a StreamPlan: checks (disk space for the output, finite weights by one read pass), then
    the decoder layers are read one at a time and written to the claimed output as each finishes
    (sparsefast.models.streamed); the rest of the checkpoint after the last."""
    from sparsefast.checkpoint import atomic_output_dir, write_beside_weights
    from sparsefast.models import load_tokenizer
    from sparsefast.models.safetensors_stream import CheckpointWriter
    from sparsefast.models.streamed import check_finite_on_disk, open_streamed, save_config

    _check_output_space(plan, claim)
    model = plan.model
    tokenizer = load_tokenizer(str(plan.directory))
    adapter = check_prunable(model, config, check_weights=False)
    calib = _calibration_ids(model, adapter, tokenizer, config, data_dir)
    check_finite_on_disk(plan, progress=progress)
    stream = open_streamed(plan)
    with atomic_output_dir(claim.path, overwrite=claim.overwrite) as tmp:
        with CheckpointWriter(tmp, plan.specs, total_parameters=model.num_parameters()) as writer:
            stream.writer = writer
            report = _prune_checked(model, adapter, config, calib, device, progress=progress, layer_stream=stream)
            _write_outside_layers(model, plan, plan.specs, writer)
        save_config(model, tmp)
        report["model"] = model_name
        report["from_disk"] = _from_disk_record(plan, stream, plan.specs)
        _log_pruned(report, log)
        write_beside_weights(tmp, tokenizer, report)
    log(f"saved {claim.path}")
    return report


def _write_outside_layers(model: nn.Module, plan: Any, specs: list, writer: Any) -> None:
    """Write the checkpoint's tensors outside the decoder layers (embeddings, final norm, head) after the layers."""
    state = model.state_dict()
    for spec in specs:
        if not spec.name.startswith(plan.layers_prefix):
            writer.write(spec.name, state[spec.name])


def _from_disk_record(plan: Any, stream: Any, specs: list) -> dict[str, Any]:
    """The report's record of a run from disk: the checkpoint read, the bytes read and written."""
    return {"checkpoint": str(plan.directory), "bytes_read": stream.bytes_read,
            "weight_bytes_written": sum(s.nbytes for s in specs)}


def _check_output_space(plan: Any, claim: Any) -> None:
    """Raise ValueError, before any work, when the output's filesystem has less free space than the plan's weights
    (an upper bound of the pruned checkpoint's)."""
    free = shutil.disk_usage(claim.path.parent).free
    if plan.weight_bytes > free:
        raise ValueError(f"the pruned checkpoint needs up to {plan.weight_bytes / 2**30:.1f} GiB, {claim.path.parent} "
                         f"has {free / 2**30:.1f} GiB free: free space or choose another --out")


def prune_structured_from_disk(model_name: str, plan: Any, config: Any, claim: Any, *, calib_source: str = "c4",
                               data_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`sparsefast prune-structured` from a StreamPlan (block strategy, on the CPU): the importances are computed
    with one decoder layer in memory at a time (sparsefast.prune.structural.importance.streamed_channel_scores),
    then each layer is read again, sliced and written to the claimed output; the rest of the checkpoint after the
    last. The checkpoint is the fully-loaded run's, byte for byte. Checks first: disk space, then (in
    select_structured, once the plan is known to be good) finite weights in one read pass."""
    import math

    from sparsefast.checkpoint import atomic_output_dir, write_beside_weights
    from sparsefast.export.architecture import set_plain_config
    from sparsefast.models import load_tokenizer
    from sparsefast.models.safetensors_stream import CheckpointWriter, TensorSpec
    from sparsefast.models.streamed import open_streamed, save_config
    from sparsefast.models.structural import structure_of
    from sparsefast.prune.structural import remove_selected, select_structured
    from sparsefast.prune.structural.slicing import pruned_shapes

    _check_output_space(plan, claim)
    model = plan.model
    tokenizer = load_tokenizer(str(plan.directory))
    stream = open_streamed(plan)
    selection = select_structured(model, tokenizer, config, calib_source=calib_source, data_dir=data_dir,
                                  progress=progress, layer_stream=stream)
    shapes = pruned_shapes(model, selection.removed)
    specs = [TensorSpec(s.name, s.dtype, shapes.get(s.name, s.shape)) for s in plan.specs]
    with atomic_output_dir(claim.path, overwrite=claim.overwrite) as tmp:
        with CheckpointWriter(tmp, specs, total_parameters=sum(map(math.prod, shapes.values()))) as writer:
            stream.writer = writer
            report = remove_selected(model, config, selection, progress=progress, layer_stream=stream)
            _write_outside_layers(model, plan, specs, writer)
        structure = None
        if config.uniform:  # every layer alike: a plain config any engine loads, no structure.json
            set_plain_config(model)
        else:
            structure = structure_of(model, model.sparsefast_layers)
        save_config(model, tmp)
        report["model"] = model_name
        report["from_disk"] = _from_disk_record(plan, stream, specs)
        write_beside_weights(tmp, tokenizer, report, structure=structure)
    return report


def _fmt_ppl(result: dict) -> str:
    """One line from an evaluate_perplexity result ({dataset: ppl} or {dataset: {"ppl": ...}})."""
    parts = []
    for name, value in result.items():
        ppl = value.get("ppl", value.get("perplexity")) if isinstance(value, dict) else value
        if isinstance(ppl, (int, float)):
            parts.append(f"{name} {ppl:.3f}")
    return ", ".join(parts) or str(result)
