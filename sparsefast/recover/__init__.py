"""LoRA recovery after pruning (`sparsefast recover`): load, train LoRA, merge, keep the zeros, save atomically.

``recover_pretrained`` is the whole pipeline; the pieces live in :mod:`sparsefast.recover.data` (records, prompt
template, tokenisation) and :mod:`sparsefast.recover.train` (the training loop, zero masks, merge); the settings,
``RecoverConfig``, in :mod:`sparsefast.config.recover`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from sparsefast.config.recover import RecoverConfig
from sparsefast.recover.data import (
    ALPACA_FILE,
    RecoveryData,
    alpaca_prompt,
    collate,
    load_recovery_data,
    tokenize_recovery_data,
)
from sparsefast.recover.train import (
    NonFiniteLossError,
    lora_recover,
    reapply_zero_masks,
    record_zero_masks,
    target_linears,
)

__all__ = ["ALPACA_FILE", "NonFiniteLossError", "RecoverConfig", "RecoveryData", "alpaca_prompt",
           "collate", "load_recovery_data", "lora_recover", "reapply_zero_masks",
           "record_zero_masks", "recover_pretrained", "save_recovered", "target_linears", "tokenize_recovery_data"]


def _source_report(path: str) -> dict:
    """The input checkpoint's sparsefast.json (its pruning record) when it has one, else {}."""
    from sparsefast.checkpoint import REPORT_NAME

    report = Path(path) / REPORT_NAME
    if not report.is_file():
        return {}
    data = json.loads(report.read_text())
    return data if isinstance(data, dict) else {"source_report": data}


def save_recovered(model, tokenizer, out: str | os.PathLike, report: dict, *, overwrite: bool = False,
                   structural: bool = False, sources: tuple = ()) -> Path:
    """Save through the one checkpoint writer (atomic, exclusive): a structurally pruned model with its
    structure.json, any other model as a standard HF checkpoint; ``report`` goes to sparsefast.json. ``out``: a path,
    or the ``sparsefast.checkpoint.OutputClaim`` the run took before its work (its overwrite and sources apply)."""
    if structural:
        from sparsefast.models.structural import save_structural

        return Path(save_structural(model, out, tokenizer=tokenizer, report=report, overwrite=overwrite,
                                    sources=sources))
    from sparsefast.checkpoint import save_checkpoint

    return save_checkpoint(model, tokenizer, out, report, overwrite=overwrite, sources=sources)


def recover_pretrained(model_name: str, data: str, out: str | None, config: RecoverConfig, *,
                       data_dir: str | None = None, device: str = "auto", overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Load ``model_name`` (``sparsefast.models.load_model``: HF dir, hub id, .gguf, 'smollm2' or a structural
    checkpoint), LoRA-recover it on ``data`` and save it to ``out`` (None: no save). Returns the report written to
    sparsefast.json: the input's own report plus a ``recovery`` entry (settings, data, loss curve, speed).

    Training runs on ``accelerate``: in one process as it is, under ``accelerate launch --multi_gpu`` / ``torchrun``
    on every process (DDP; sparsefast.recover.train). Only the main process claims and
    writes ``out``, once, after the others have finished training. Every argument and the data file are checked
    before the model is loaded; nothing is written on failure.
    """
    import torch
    from accelerate import Accelerator

    from sparsefast.checkpoint import OutputClaim, check_savable
    from sparsefast.data import check_data_dir
    from sparsefast.device import resolve_device, resolve_dtype
    from sparsefast.models import check_finite_weights, load_model, local_source_paths, resolve_model_source

    sources = tuple(local_source_paths(model_name))
    dev = resolve_device(device)
    accelerator = Accelerator(cpu=dev.type == "cpu")
    main = accelerator.is_main_process
    # `out` is checked and claimed first (by the main process) and held until the save: a second run on the same
    # `out` stops now, before any work (sparsefast.checkpoint.OutputClaim)
    claim = OutputClaim(out, overwrite, sources=sources) if out is not None and main else None
    with claim or contextlib.nullcontext():
        check_data_dir(data_dir)
        if config.dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16 support; use --dtype fp32")
        records = load_recovery_data(data, data_dir=data_dir, max_samples=config.max_samples)
        structural = resolve_model_source(model_name)[0] == "structural"  # a dir with structure.json
        model, tokenizer = load_model(model_name, dtype=resolve_dtype(config.dtype), device=str(dev))
        check_finite_weights(model)
        if out is not None:
            check_savable(model)
        samples, dropped = tokenize_recovery_data(records, tokenizer, config.cutoff_len)
        model, stats = lora_recover(model, tokenizer, samples, config, device=dev, progress=progress,
                                    accelerator=accelerator)
        report = _source_report(model_name) if Path(model_name).is_dir() else {}
        report["recovery"] = {"method": "lora", "model": model_name, "data": records.source, "data_kind": records.kind,
                              "records": len(records.records), "dropped_too_long": dropped,
                              "skipped_empty_output": len(records.skipped_empty_output),
                              "device": str(accelerator.device), "distributed": str(accelerator.distributed_type),
                              "saved_dtype": config.dtype, "zero_masks": "recorded before training, re-applied after "
                              "merge", **stats}
        accelerator.wait_for_everyone()
        if claim is not None:
            report["recovery"]["out"] = str(save_recovered(model, tokenizer, claim, report, structural=structural))
        report["recovery"]["main_process"] = main
    return report
