"""Log-probabilities the engine reports: of each generated token (`logprobs`) and of each prompt token (prompt
logprobs, from the prefill forward: no second pass over the prompt), each with the k most likely tokens at its
position, as OpenAI's and vLLM's `logprobs` carry them.

They are the model's own distribution, log_softmax of the raw logits in float32, before temperature, top-k / top-p or
any other sampling rule (vLLM's default "raw_logprobs"): what evaluation harnesses score with. The chosen token's
logprob and the top-k values are read from the same tensor, so a greedily chosen token's logprob equals the largest
top value exactly (lm-eval's `is_greedy` compares them with ==).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_LOGPROBS = 20  # most likely alternatives reported per position (vLLM's default limit; OpenAI's chat allows 20)


@dataclass(frozen=True)
class TokenLogprob:
    """token: the id at this position; logprob: its log-probability (None for a prompt's first token, which nothing
    predicts); top: the k most likely (id, logprob) at this position, most likely first (ties: lowest id first)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def position_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of logits [n, vocab] (any float dtype) for tokens[i] at row i, with the top k."""
    import torch  # here: the HTTP layer imports TokenLogprob from this module without torch

    if logits.shape[0] != len(tokens):
        raise ValueError(f"position_logprobs: {logits.shape[0]} rows of logits for {len(tokens)} tokens")
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(tokens), device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen)]
    # a stable sort by value: equal logprobs keep id order (torch.topk does not promise one)
    values, order = torch.sort(lp, dim=-1, descending=True, stable=True)
    top_v, top_i = values[:, :k].tolist(), order[:, :k].tolist()
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, top_i, top_v)]


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> tuple[TokenLogprob, ...]:
    """Logprobs of every prompt token from the prefill's logits [len(prompt), vocab] (row t: the distribution of
    token t + 1): the first token's logprob is None (nothing precedes it)."""
    return (TokenLogprob(prompt[0], None), *position_logprobs(logits[:-1], prompt[1:], k))



# ---- OpenAI's response shapes -------------------------------------------------------------------------------------
class TokenTexts:
    """The text each token adds where it stands, as the logprobs objects name tokens: decoding a token alone loses
    what depends on its left context (SentencePiece drops the leading space of a text's first token: " and" alone
    decodes to "and"), so a token's text is decode(context + [token]) minus decode(context), with the CONTEXT_TOKENS
    tokens before it as context (the incremental detokenizer's rule). Keeps that context across calls (`advance`), so
    one instance follows one answer through its stream."""

    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.context = list(context)[-self.CONTEXT_TOKENS:]

    def text(self, token: int) -> str:
        """The text `token` adds after the current context."""
        base = self.tokenizer.decode(self.context)
        full = self.tokenizer.decode([*self.context, token])
        return full[len(base):] if full.startswith(base) else self.tokenizer.decode([token])

    def advance(self, token: int) -> None:
        self.context = [*self.context, token][-self.CONTEXT_TOKENS:]


def _top_dict(entry: TokenLogprob, texts: TokenTexts) -> dict[str, float]:
    top: dict[str, float] = {}
    for t, v in entry.top:  # most likely first: where two ids decode alike, the likelier one's value stays
        top.setdefault(texts.text(t), v)
    return top


def completion_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts, text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object of consecutive tokens: {"tokens", "token_logprobs", "top_logprobs",
    "text_offset"}; a token without a logprob (a prompt's first) has None in token_logprobs and top_logprobs.
    Offsets count the characters of the token texts, from `text_offset`; `texts` advances over the tokens."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        text = texts.text(entry.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry.logprob)
        out["top_logprobs"].append(None if entry.logprob is None else _top_dict(entry, texts))
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        texts.advance(entry.token)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict:
    """The chat completions `logprobs` object: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
    "logprob", "bytes"}, ...]}, ...]}; `texts` advances over the tokens."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for e in entries:
        content.append({**item(texts.text(e.token), e.logprob),
                        "top_logprobs": [item(texts.text(t), v) for t, v in e.top]})
        texts.advance(e.token)
    return {"content": content}
