"""Structured output: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
(OpenAI's shapes), decoded under a grammar by llguidance (the Rust grammar engine that vLLM and SGLang offer as their
"guidance" backend).

Three steps, three places:
* `GrammarCompiler.compile` (the route, in a worker thread, before submit): the response format becomes a `Grammar`,
  a matcher built and checked once (an invalid schema, or one this model's vocabulary cannot start to write, is a
  400 naming response_format, before anything is queued).
* `Grammar.matcher()` (the engine, per running sample): a private copy of that matcher (microseconds), so n samples
  and concurrent requests never share parser state.
* `GrammarMatcher.mask` / `accept` (the engine's per-request sampling step): the scores of every token the grammar
  does not allow next become -inf, after the logit adjustments and before greedy or sampled choice; the chosen token
  is then consumed. Once the value is complete only EOS is allowed, so the request ends "stop" with the JSON as its
  text (or "length" if max_tokens came first: the JSON is then cut short, as OpenAI's is).

Why llguidance rather than xgrammar: a 3 MB wheel with no dependencies (xgrammar 0.2.9 pulls apache-tvm-ffi and
triton), grammars compiled lazily as tokens come (building a SmolLM2 matcher for a small schema: < 1 ms; one mask:
~1 ms on the 2-core Xeon, ad-hoc), and the JSON Schema subset OpenAI's structured outputs use.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import torch

__all__ = ["Grammar", "GrammarCompiler", "GrammarMatcher"]

_BITS = torch.ones(32, dtype=torch.int32) << torch.arange(32, dtype=torch.int32)  # bit b of a mask word; 1<<31 < 0


class GrammarMatcher:
    """One sample's parser state: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """A copy of `scores` [vocab] with -inf for every token the grammar does not allow next (tokens beyond the
        tokenizer's vocabulary included). Raises ValueError when the grammar allows no token at all."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] & _BITS) != 0).flatten()
        vocab = scores.numel()
        if allowed.numel() < vocab:
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
        allowed = allowed[:vocab].to(scores.device)
        if not bool(allowed.any()):
            raise ValueError(f"response_format: no token can continue the output here "
                             f"({self._matcher.get_error() or 'the grammar allows nothing'})")
        return scores.float().masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        """Consume the chosen token; raises ValueError if the grammar does not allow it."""
        if not self._matcher.consume_token(int(token)):
            raise ValueError(f"response_format: token {token} breaks the grammar: {self._matcher.get_error()}")


class Grammar:
    """A compiled response format: `matcher()` gives each sample its own `GrammarMatcher`. kind: "json_object" or
    "json_schema"."""

    def __init__(self, kind: str, matcher: Any) -> None:
        self.kind, self._template = kind, matcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy())

    def __repr__(self) -> str:
        return f"Grammar({self.kind})"


class GrammarCompiler:
    """Compiles response formats for one tokenizer. The llguidance view of the tokenizer is built on first use
    (~0.3 s for SmolLM2's 49k tokens) and shared after; `compile` may be called from several threads."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
                except ValueError as exc:
                    raise ValueError(f"response_format: this model's tokenizer cannot drive a grammar ({exc}); "
                                     "structured output needs a fast (tokenizers) tokenizer") from exc
            return self._tokenizer

    def compile(self, kind: str, schema: dict[str, Any] | None = None) -> Grammar:
        """The grammar of an OpenAI response_format of type `kind`: "json_object" (any JSON object) or "json_schema"
        (`schema`, a JSON Schema). Raises ValueError("response_format: ...") for a schema that cannot be compiled
        or that allows no first token with this vocabulary."""
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind != "json_schema" or not isinstance(schema, dict):
            raise ValueError(f"response_format: needs type json_object, or json_schema with a schema object; got "
                             f"type {kind!r}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        except ValueError as exc:
            raise ValueError(f"response_format: the JSON schema is not valid ({exc}); send a JSON Schema "
                             "object") from exc
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format: the JSON schema cannot be compiled: {matcher.get_error()}; "
                             "fix the schema (OpenAI's structured-output subset of JSON Schema)")
        if not any(matcher.compute_bitmask()):
            raise ValueError("response_format: no token of this model's vocabulary can start a value of this schema; "
                             "this model cannot write it")
        return Grammar(kind, matcher)
