"""Per-request sampling settings and the next-token rule: greedy (temperature 0), or temperature → top-k → top-p
(nucleus, Holtzman et al. 2019, arXiv:1904.09751) → one multinomial draw with the request's own generator.

Sampling runs row by row on float32 logits, so a seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. temperature 0 = greedy; top_k 0 = off; seed → a private torch.Generator."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        """Return self, or raise ValueError("<field>: <problem>; <fix>") for the first bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}; pass e.g. 16")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature: must be a number in [0, 100], got {self.temperature!r}; 0 is greedy")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}; 1 keeps every token")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {self.top_k!r}; 0 turns it off")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed: must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: must be a tuple of non-empty strings, got {self.stop!r}")
        return self

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with params.seed (on `device`), or None to use torch's global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id from one row of logits [vocab] (any float dtype).

    Greedy: argmax (ties → lowest id, as torch.argmax and HF generate). Otherwise softmax(logits / T) restricted to
    the top_k largest logits, then to the smallest set whose probability reaches top_p (the most likely token is
    always kept), renormalised, one torch.multinomial draw.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / float(params.temperature)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass before it already reaches top_p; the first token has zero mass before it
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= float(params.top_p)
        scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), device=scores.device))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
