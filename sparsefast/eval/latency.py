"""Decode latency of a causal LM: greedy generation with the KV cache, timed per token (gpt-fast's measurement:
one prompt forward, then one forward per new token, batch 1 by default; conditions returned with the numbers).

The prompt is random token ids (latency does not depend on the text); the first `warmup` generations are not timed.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sparsefast.device import resolve_device
from sparsefast.models.loading import cache_argument, returned_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_latency(model: nn.Module, *, prompt_len: int = 128, new_tokens: int = 64, batch_size: int = 1,
                   repeats: int = 3, warmup: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Time `repeats` greedy generations of `new_tokens` tokens after a `prompt_len`-token prompt.

    Returns ``{"prefill_ms", "decode_ms_per_token", "tokens_per_s", "runs_decode_ms_per_token", ...}``: medians over
    the repeats (prefill: the prompt forward; decode: mean time of one cached forward + argmax per new token), plus
    the conditions (batch, lengths, device, dtype, torch threads).
    """
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1),
                             ("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"decode_latency: {name} must be an integer >= {low}, got {value!r}")
    dev = resolve_device(str(device))
    model.to(dev).eval()
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(dev)
    prefill, per_token = [], []
    cache_name = cache_argument(model)
    for run in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        t1 = time.perf_counter()
        cache = returned_cache(out)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{cache_name: cache})
            cache = returned_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        t2 = time.perf_counter()
        if run >= warmup:
            prefill.append((t1 - t0) * 1e3)
            per_token.append((t2 - t1) * 1e3 / new_tokens)
    ms = statistics.median(per_token)
    return {"prefill_ms": statistics.median(prefill), "decode_ms_per_token": ms,
            "tokens_per_s": batch_size * 1e3 / ms, "runs_decode_ms_per_token": per_token, "batch_size": batch_size,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "device": str(dev),
            "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads()}
