"""Perplexity over non-overlapping windows, the protocol of GPTQ / SparseGPT / Wanda (`*_eval` in their repos) and
LLM-Pruner's `PPLMetric`.

The token stream [1, T] is cut into n = T // seqlen windows of `seqlen` tokens; the tail (T mod seqlen tokens) is
dropped. Each window is scored independently (no context carried over), every position but the last predicts the
next token, and

    ppl = exp( Σ_windows Σ_t NLL(x_{t+1} | x_{≤t}) / (n · (seqlen − 1)) ).

Because every window predicts the same number of tokens, this equals the references' exp(mean of per-window mean
losses). Losses are computed and summed in fp32 (fp64 accumulator) whatever the model's dtype.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsefast.device import resolve_device


def window_nll(model: nn.Module, windows: torch.LongTensor) -> torch.Tensor:
    """Summed next-token NLL of each window: LongTensor [B, S] (on the model's device) → fp32 tensor [B]."""
    logits = model(input_ids=windows, use_cache=False).logits  # [B, S, V]
    shift_logits = logits[:, :-1, :].float()
    targets = windows[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokens: torch.LongTensor,
    seqlen: int,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_windows: int | None = None,
) -> float:
    """Perplexity of `model` on `tokens` (LongTensor [1, T]) with non-overlapping windows of `seqlen`.

    Args:
        model: a causal LM returning `.logits` [B, S, V]; it is put in eval mode and moved to `device` (in place,
            like `Module.to`) if it is not there already.
        tokens: LongTensor [1, T] from `sparsefast.data.get_eval_tokens`, T ≥ seqlen.
        seqlen: window length, 2 ≤ seqlen ≤ the model's context (`max_position_embeddings`).
        batch_size: windows per forward pass (the result does not depend on it beyond float rounding).
        device: where to run ("cpu", "cuda", "auto", ...).
        progress: show a tqdm bar over windows.
        max_windows: evaluate only the first N windows (a quick estimate on slow hardware; None = all). Results
            with a limit are not comparable to published full-test-set numbers: report the limit with them.

    Returns exp(mean NLL) as a Python float (inf if the mean NLL overflows exp, nan if the model produced nan).
    Raises ValueError for bad shapes or seqlen before any forward pass.
    """
    from sparsefast.models import model_context

    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must have shape [1, T], got {tuple(tokens.shape)}")
    if tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor of token ids, got {tokens.dtype}")
    if int(seqlen) != seqlen or seqlen < 2:
        raise ValueError(f"seqlen must be an integer ≥ 2 (one prediction needs two tokens), got {seqlen!r}")
    if max_windows is not None and (int(max_windows) != max_windows or max_windows < 1):
        raise ValueError(f"max_windows must be an integer ≥ 1 (or None for all), got {max_windows!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    context = model_context(model)
    if context is not None and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {context} tokens; use --seqlen ≤ {context}")
    total = tokens.shape[1]
    if total < seqlen:
        raise ValueError(f"the evaluation text has {total} tokens, fewer than one window of seqlen={seqlen}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ValueError(f"token ids outside [0, {vocab}): was the text tokenized with this model's tokenizer?")

    dev = resolve_device(device)
    model.eval()
    if next(model.parameters()).device != dev:
        model.to(dev)
    n_windows = total // seqlen if max_windows is None else min(total // seqlen, max_windows)
    windows = tokens[0, : n_windows * seqlen].view(n_windows, seqlen)
    nll_sum = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=n_windows, desc=f"ppl seqlen={seqlen}", unit="win", disable=not progress, leave=False)
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(dev)
        nll_sum += window_nll(model, batch).double().sum().cpu()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{_exp(nll_sum.item() / ((start + batch.shape[0]) * (seqlen - 1))):.3f}")
    bar.close()
    return _exp(nll_sum.item() / (n_windows * (seqlen - 1)))


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    datasets: list[str],
    *,
    seqlen: int,
    protocol: str = "gptq",
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity on each of `datasets` ("wikitext2", "ptb", "c4") under `protocol` ("gptq" or "llm-pruner") →
    {name: ppl}. Every name, the protocol and every data file are checked before the first evaluation, so a typo
    or a missing PTB file fails fast instead of after an hour of WikiText-2."""
    from sparsefast.data import check_eval_request, eval_data_files, find_data_file, get_eval_tokens

    if not datasets:
        raise ValueError("no perplexity dataset given; choose from wikitext2, ptb, c4")
    for name in datasets:
        check_eval_request(name, protocol)
        find_data_file(eval_data_files(name, protocol), data_dir)
    results: dict[str, float] = {}
    for name in datasets:
        tokens = get_eval_tokens(name, tokenizer, protocol, data_dir, seqlen=seqlen)
        results[name] = perplexity(model, tokens, seqlen, batch_size=batch_size, device=device, progress=progress,
                                   max_windows=max_windows)
    return results


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
