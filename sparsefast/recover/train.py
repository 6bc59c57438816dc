"""LoRA recovery of a pruned model (LLM-Pruner's post-training, Ma et al., 2023, arXiv:2305.11627; LoRA: Hu et al.,
2021, arXiv:2106.09685), merged back into the weights.

Settings: :class:`sparsefast.config.RecoverConfig` (valid by construction).

Numerics: compute runs in bf16 or fp32, never fp16 -- LLM-Pruner's fp16 autocast overflows to NaN on LLaMA-2
(horseee/LLM-Pruner#13); bf16 has fp32's exponent range. LoRA adapters and AdamW states stay fp32 (peft upcasts
adapters of a bf16 base), logits are upcast to fp32 for the loss. A non-finite loss or gradient norm stops the run
with :class:`NonFiniteLossError` before anything is saved.

Loss: token-level cross-entropy averaged over every label token of an optimizer step (all ``grad_accum``
micro-batches together), so short and long samples weigh the same per token. Schedule: AdamW (no weight decay),
linear warm-up over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping at ``max_grad_norm``.

Distributed: with an ``accelerate.Accelerator`` (``sparsefast recover`` under ``accelerate launch`` / ``torchrun``),
the model is wrapped by accelerate for DDP (gloo on CPU, NCCL on GPUs; FSDP and DeepSpeed are refused with a clear
error: the merge after training needs the full weights on every process) and the global batch of an optimizer step
is ``batch_size * grad_accum * num_processes`` samples: its micro-batches are dealt round the processes (one that
gets fewer runs a zero-weight copy, so every process joins every gradient reduction), each loss is divided by the
step's global label-token count and scaled by the process count (DDP averages gradients), so every process takes
exactly the single-process step on the same global batch; the logged loss is the sum over processes. LoRA dropout
masks are drawn per process, so the curves match a single process exactly only with ``lora_dropout=0``.

Sparsity: mask-pruned checkpoints (Wanda, SparseGPT, N:M) have exact zeros that the dense LoRA update ``B @ A``
would fill. The zero mask of every target linear is recorded before training and re-applied after merging, so the
saved model keeps exactly the same zeros (2:4 stays 2:4). A dense model's few exact zeros are kept too, which is
harmless. Training itself sees the unmasked update; the re-applied mask changes only the merged weights.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsefast.config.recover import RecoverConfig
from sparsefast.device import resolve_dtype
from sparsefast.ops.int8_rows import refuse_quantized
from sparsefast.recover.data import collate


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient norm became NaN/inf; nothing was saved."""


def target_linears(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose name ends with one of ``target_modules`` (peft's matching rule).

    Raises ValueError listing the model's linear layer names when nothing matches.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in target_modules)}
    if not found:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"no linear layer matches --target-modules {','.join(target_modules)}; this model's linear "
                         f"layers are named {', '.join(kinds)}")
    return found


def record_zero_masks(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{name: bool mask [out, in]}`` (True where the weight is exactly 0), on CPU, for target linears with zeros."""
    masks = {}
    for name, lin in target_linears(model, target_modules).items():
        zero = lin.weight.detach() == 0
        if zero.any():
            masks[name] = zero.cpu()
    return masks


@torch.no_grad()
def reapply_zero_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero every recorded position again; returns how many weights had become non-zero."""
    refilled = 0
    for name, zero in masks.items():
        weight = model.get_submodule(name).weight
        zero = zero.to(weight.device)
        refilled += int((weight[zero] != 0).sum())
        weight.masked_fill_(zero, 0)
    return refilled


def _step_groups(n: int, cfg: RecoverConfig, gen: torch.Generator, processes: int = 1) -> list[list[list[int]]]:
    """Per optimizer step, its micro-batches of sample indices (one shuffled pass per epoch); a step holds
    grad_accum micro-batches per process."""
    steps = []
    per_step = cfg.grad_accum * processes
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        steps += [micro[i:i + per_step] for i in range(0, len(micro), per_step)]
    return steps


def _my_micro_batches(group: list[list[int]], rank: int, processes: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of a step, as (indices, weight): dealt round the processes; a process left
    with fewer than the others repeats the step's first micro-batch at weight 0, so all run the same count."""
    mine = [(micro, 1.0) for micro in group[rank::processes]]
    count = -(-len(group) // processes)
    return mine + [(group[0], 0.0)] * (count - len(mine))


def lora_recover(model: nn.Module, tokenizer, samples: list[dict], config: RecoverConfig, *,
                 device: str | torch.device = "cpu", progress: bool = True,
                 accelerator: Any = None) -> tuple[nn.Module, dict]:
    """Train LoRA adapters on ``samples`` (from :func:`tokenize_recovery_data`), merge them and return
    ``(model, stats)``. ``model`` is modified in place and cast to the compute dtype; the returned model is the same
    transformers module with merged weights (no peft wrappers), in eval mode. ``accelerator``: an
    ``accelerate.Accelerator`` to train under (its device replaces ``device``; see the module docstring).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    if not samples:
        raise ValueError("no training samples")
    refuse_quantized(model, "recover (LoRA)")  # merged adapters would move the weights off their int8 grid
    target_linears(model, config.target_modules)  # fail before any work
    masks = record_zero_masks(model, config.target_modules)
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    if accelerator is not None:
        device = accelerator.device
    model.to(device=device, dtype=resolve_dtype(config.dtype))
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    if config.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (no input grads needed)
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    trained = peft_model
    if accelerator is not None and str(accelerator.distributed_type) not in ("DistributedType.NO",
                                                                             "DistributedType.MULTI_CPU",
                                                                             "DistributedType.MULTI_GPU"):
        raise ValueError(f"sparsefast recover runs on one device or under DDP (accelerate launch --multi_gpu, "
                         f"torchrun); {accelerator.distributed_type} is not supported yet: the merge of the LoRA "
                         "adapters needs the full weights on every process")
    if accelerator is not None:  # wraps for DDP; the scheduler stays ours (stepped once per step)
        trained, optimizer = accelerator.prepare(peft_model, optimizer)
        params = [p for p in trained.parameters() if p.requires_grad]
    steps = _step_groups(len(samples), config, torch.Generator().manual_seed(config.seed), processes)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * len(steps)), len(steps))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    trained.train()
    losses, n_tokens_total, t0 = [], 0, time.perf_counter()
    bar = tqdm(steps, desc="lora recover", unit="step", disable=not progress or rank != 0)
    for step, group in enumerate(bar):
        n_tokens = sum(sum(1 for t in samples[i]["labels"][1:] if t != -100) for micro in group for i in micro)
        mine = _my_micro_batches(group, rank, processes)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for k, (micro, weight) in enumerate(mine):
            b = collate([samples[i] for i in micro], pad_id)
            last = k == len(mine) - 1  # gradients are reduced across processes on the last micro-batch only
            sync = contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(trained)
            with sync:
                logits = trained(input_ids=b["input_ids"].to(device),
                                 attention_mask=b["attention_mask"].to(device)).logits
                labels = b["labels"][:, 1:].to(logits.device)
                loss_sum = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                       labels.reshape(-1), ignore_index=-100, reduction="sum")
                loss = loss_sum * (weight * processes / max(n_tokens, 1))
                loss.backward() if accelerator is None else accelerator.backward(loss)
            step_loss += loss_sum.detach().double() * weight
        if accelerator is not None and processes > 1:
            step_loss = accelerator.reduce(step_loss, reduction="sum")
        if not torch.isfinite(step_loss):  # every process sees the same sum, so all stop together
            raise NonFiniteLossError(
                f"loss became {step_loss.item()} at optimizer step {step + 1}/{len(steps)} "
                f"(dtype {config.dtype}, lr {config.lr}); training stopped and nothing was saved. "
                + ("Use --dtype fp32 or a lower --lr" if config.dtype != "fp32" else "Lower --lr")
                + ", and check the input model for NaN/inf weights")
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if accelerator is None
                     else accelerator.clip_grad_norm_(params, config.max_grad_norm))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"gradient norm became {grad_norm.item()} at optimizer step {step + 1}/"
                                     f"{len(steps)}; training stopped and nothing was saved. Lower --lr")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss.item() / max(n_tokens, 1))
        n_tokens_total += n_tokens
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - t0
    if accelerator is not None:
        peft_model = accelerator.unwrap_model(trained)
    model = peft_model.merge_and_unload()
    refilled = reapply_zero_masks(model, masks)
    if config.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.config.use_cache = use_cache
    model.eval()
    seen = len(samples) * config.epochs
    stats = {
        "config": {**asdict(config), "target_modules": list(config.target_modules)},
        "samples": len(samples), "optimizer_steps": len(steps), "label_tokens": n_tokens_total,
        "processes": processes,
        "seconds": seconds, "samples_per_s": seen / seconds if seconds > 0 else float("inf"),
        "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
        "masked_linears": len(masks), "masked_weights_refilled_then_zeroed": refilled,
    }
    return model, stats
