"""Per-request sampling settings and the next-token rule: greedy (temperature 0), or temperature → top-k → top-p
(nucleus, Holtzman et al. 2019, arXiv:1904.09751) → one multinomial draw with the request's own generator.

Sampling runs row by row on float32 logits, so a seeded request draws the same tokens whatever else is in the batch.
No accepted parameter can make the distribution NaN/inf: the ranges are OpenAI's (temperature in [0, 2], top_p in
(0, 1], finite numbers), a temperature below MIN_TEMPERATURE is greedy (a float32 division by 1e-300 divides by 0),
the scores are shifted so the most likely token scores 0 before they are divided, and a nucleus always keeps its
most likely token. The engine still runs sampling per request (sparsefast.serve.engine): a failure here, e.g. from
NaN logits, fails that request alone.

`adjust_logits` applies the rules that change the scores themselves, before greedy or sampled choice (OpenAI's
and vLLM's order: they apply to greedy requests too): `logit_bias`, the repetition penalty over prompt + output
(CTRL, Keskar et al. 2019: a positive logit divided by it, a negative one multiplied; vLLM's and HF's rule), the
frequency and presence penalties over the output (OpenAI's definition: logit - count * frequency - (count > 0) *
presence), and `min_tokens` (EOS is -inf until that many tokens were generated). `warp_logits` then shapes the
distribution (temperature, top-k, top-p). Reported logprobs are the model's raw ones, before both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsefast.serve.logprobs import MAX_LOGPROBS
from sparsefast.serve.structured import Grammar

MIN_TEMPERATURE = 1e-5  # below this a request is greedy (vLLM's _SAMPLING_EPS): x / T stays finite in float32
MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
MAX_STOP_STRINGS = 4  # OpenAI's limit
# ours (OpenAI states none): with MAX_STOP_STRINGS it bounds the stop check of one decode step
# (sparsefast.serve.detokenize: a search of at most this many characters plus the step's new text per stop string)
MAX_STOP_CHARS = 256
MAX_REPETITION_PENALTY = 2.0  # ours: above it the rule mostly forbids every seen token


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. temperature 0 (or below MIN_TEMPERATURE) = greedy; top_k 0 = off;
    seed → a private torch.Generator; stop: at most MAX_STOP_STRINGS strings of at most MAX_STOP_CHARS characters.
    logprobs: report each generated token's logprob and this many most likely alternatives (0..MAX_LOGPROBS; None
    = none); prompt_logprobs: the same for every prompt token (sparsefast.serve.logprobs). max_tokens 0 generates
    nothing and is allowed only with prompt_logprobs (scoring a prompt). grammar: a compiled response_format
    (sparsefast.serve.structured): only the tokens it allows are chosen."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    grammar: Grammar | None = None

    def validate(self) -> SamplingParams:
        """Return self, or raise ValueError("<field>: <problem>; <fix>") for the first bad field."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name}: must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens: must be an integer >= 1 (0 only to score a prompt, with prompt "
                             f"logprobs), got {self.max_tokens!r}; pass e.g. 16")
        _check_finite("temperature", self.temperature)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature: must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}; "
                             "0 is greedy")
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}; 1 keeps every token")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {self.top_k!r}; 0 turns it off")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed: must be an integer in [0, 2**63) or None, got {self.seed!r}")
        _check_stop(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be true or false, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_finite(name, getattr(self, name))
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}: must be in [-2, 2], got {getattr(self, name)!r}; 0 turns it off")
        _check_finite("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty: must be in (0, {MAX_REPETITION_PENALTY:g}], got "
                             f"{self.repetition_penalty!r}; 1 turns it off")
        for token, bias in self.logit_bias:
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias: keys must be token ids >= 0, got {token!r}")
            _check_finite("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {bias!r} for token {token}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: must be an integer in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens!r}")
        if self.grammar is not None:
            if not isinstance(self.grammar, Grammar):
                raise ValueError(f"grammar: must be a sparsefast.serve.structured.Grammar, got "
                                 f"{type(self.grammar).__name__}")
            # the grammar ends the output with EOS once the value is complete; both would forbid that EOS
            for name in ("ignore_eos", "min_tokens"):
                if getattr(self, name):
                    raise ValueError(f"{name}: cannot be combined with response_format (the output must end when "
                                     "the JSON value is complete); leave it unset")
        return self

    @property
    def adjusts_logits(self) -> bool:
        """Whether `adjust_logits` changes anything for this request (else the engine skips it)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return float(self.temperature) < MIN_TEMPERATURE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


def _check_stop(stop: object) -> None:
    if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop: must be a tuple of non-empty strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}; keep the ones that matter")
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, stop string {i} "
                             f"has {len(s)}; shorten it")
        if (why := invalid_unicode(s)) is not None:
            raise ValueError(f"stop: stop string {i} is not valid Unicode ({why}); send UTF-8 text")


def invalid_unicode(text: str) -> str | None:
    """Why `text` is not valid Unicode text, or None when it is. Python strings may hold lone UTF-16 surrogates (its
    JSON reader makes one from "\\ud800" or the bytes ED A0 80), which UTF-8 cannot encode and tokenizers refuse."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
    return None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with params.seed (on `device`), or None to use torch's global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                  eos_ids: frozenset[int] | set[int]) -> torch.Tensor:
    """float32 scores [vocab] from one row of logits [vocab] after logit_bias, the repetition penalty (prompt +
    output), the frequency / presence penalties (output) and min_tokens (module docstring); `logits` itself, not
    converted, when the request sets none of them (the hot path: every plain request's every token)."""
    if not params.adjusts_logits:
        return logits
    scores = logits.float().clone()
    vocab = scores.numel()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=scores.device)
        if int(ids.max()) >= vocab:
            raise ValueError(f"logit_bias: token id {int(ids.max())} is outside the vocabulary [0, {vocab})")
        scores.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], device=scores.device))
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.unique(torch.tensor(prompt + output, device=scores.device))
        vals = scores[seen]
        p = float(params.repetition_penalty)
        scores[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.frequency_penalty or params.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=scores.device), minlength=vocab)[:vocab].float()
        scores -= counts * float(params.frequency_penalty) + (counts > 0).float() * float(params.presence_penalty)
    if len(output) < params.min_tokens and not params.ignore_eos and eos_ids:
        scores[[t for t in eos_ids if t < vocab]] = float("-inf")
    return scores


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution's scores: float32 [vocab] from one row of logits [vocab] (any float dtype), -inf for
    the tokens top_k / top_p exclude; softmax of the result is what `sample_next` draws from.

    Scores are (logits - max) / temperature: the most likely token scores exactly 0 and every other score is <= 0, so
    no temperature >= MIN_TEMPERATURE overflows and the softmax has at least one finite term, whatever the logits'
    magnitude (they must be finite where they matter: NaN logits are a model failure, not a parameter's).
    """
    scores = logits.float()
    scores = (scores - scores.max()) / float(params.temperature)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely token always stays (a top_p
        # below float32's smallest number compares as 0, which its zero mass before it would reach)
        drop = torch.cumsum(probs, dim=-1) - probs >= float(params.top_p)
        drop[0] = False
        scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), device=scores.device))
    return scores


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id from one row of logits [vocab] (any float dtype).

    Greedy: argmax (ties → lowest id, as torch.argmax and HF generate). Otherwise one torch.multinomial draw from
    softmax(warp_logits(logits, params)).
    """
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(warp_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
