"""A served model as the zero-shot scorer: `sparsefast eval MODEL --tasks ... --server URL`.

The server is asked what lm-eval-harness's ``local-completions`` model asks an OpenAI-compatible server for its
loglikelihood requests (lm-eval 0.4's ``LocalCompletionsAPI``): POST /v1/completions with ``prompt`` a list of
token-id lists (``prompts_per_request`` of them, longest first), ``echo: true``, ``logprobs: 1``, ``max_tokens: 1``,
``temperature: 0``; each choice's ``logprobs.token_logprobs[i]`` is the log-probability of prompt token ``i`` (None
for the first), ``top_logprobs[i]`` the most likely token's. A continuation's log-likelihood is the float64 sum of
its tokens' entries; it is greedy where each entry equals its position's top value (lm-eval compares them with
``==``; sparsefast's server reads both from one tensor, so a greedy token's are equal exactly).

The token ids are made here with MODEL's tokenizer (:func:`sparsefast.eval.zeroshot.encode_requests`), exactly as
for the model in this process, so both scorers score the same ids. Before any scoring, :meth:`ServerScorer.connect`
and :meth:`ServerScorer.check` answer in one line what is wrong: a URL that is not http(s), a server that cannot be
reached or wants a key, a server that does not return prompt logprobs, or one whose tokenizer decodes MODEL's ids to
other text. Plain HTTP (urllib), one request at a time.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tqdm.auto import tqdm

from sparsefast.eval.zeroshot import Loglikelihood

PROMPTS_PER_REQUEST = 8  # `sparsefast serve`'s default --max-batch: one request fills one decode batch
DEFAULT_MAX_MODEL_LEN = 2048  # where /v1/models does not say (lm-eval's local-completions default max_length)
PROBE_TEXT = "Once upon a time, the quick brown fox (42%) said: \"Hello!\""


def check_server_url(url: str) -> str:
    """The base URL ("http://host:port[/prefix]", no trailing "/" or "/v1") of `url`; ValueError unless it is an
    http(s) URL with a host."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"--server {url!r} is not an http(s) URL; give the server's base URL, e.g. "
                         "http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ServerScorer:
    """Loglikelihoods from the model served at `url` (a LoglikelihoodScorer). Call `connect()` and then
    `check(tokenizer)` before `score`; `model` and `max_tokens` are known after `connect()`."""

    def __init__(self, url: str, *, api_key: str | None = None, prompts_per_request: int = PROMPTS_PER_REQUEST,
                 timeout: float = 600.0) -> None:
        if prompts_per_request < 1:
            raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
        self.base_url = check_server_url(url)
        self.api_key, self.prompts_per_request, self.timeout = api_key, prompts_per_request, timeout
        self.model: str | None = None
        self.max_model_len: int | None = None
        self.max_tokens = DEFAULT_MAX_MODEL_LEN - 1

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> Any:
        """JSON of GET (body None) or POST `path`; ConnectionError / ValueError in one line naming the fix."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(self.base_url, path, exc.code, _error_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"cannot reach the server at {self.base_url} ({reason}); start it (sparsefast serve "
                                  "MODEL) or fix --server") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ValueError(f"{url} did not answer JSON; is {self.base_url} an OpenAI-compatible server?") from None

    # ---- before scoring -----------------------------------------------------------------------------------------
    def connect(self) -> dict:
        """GET /v1/models: the served model's id (the one model served) and its max_model_len when reported; the
        longest sequence scored is max_model_len - 1 (one token is generated, as lm-eval asks). Returns the card."""
        listing = self._request("/v1/models")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) and "id" in c for c in cards):
            raise ValueError(f"{self.base_url}/v1/models lists no model; is it an OpenAI-compatible server?")
        if len(cards) > 1:
            raise ValueError(f"{self.base_url} serves {len(cards)} models ({', '.join(c['id'] for c in cards)}); "
                             "--server needs a server of one model")
        card = cards[0]
        self.model = card["id"]
        if isinstance(card.get("max_model_len"), int) and card["max_model_len"] > 1:
            self.max_model_len = card["max_model_len"]
        self.max_tokens = (self.max_model_len or DEFAULT_MAX_MODEL_LEN) - 1
        return card

    def check(self, tokenizer) -> None:
        """Score one prompt of ids: ValueError unless the server returns a logprob for every prompt token after the
        first and echoes the text `tokenizer` decodes the ids to (else it tokenizes otherwise: another model)."""
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        choice = self._complete([ids], probe=True)[0]
        lp = choice.get("logprobs") or {}
        values, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
        if (not isinstance(values, list) or not isinstance(tops, list) or len(values) < len(ids)
                or any(not isinstance(v, (int, float)) for v in values[1:len(ids)])
                or any(not isinstance(t, dict) or not t for t in tops[1:len(ids)])):
            raise ValueError(f"the server at {self.base_url} does not return prompt logprobs (echo + logprobs on "
                             "/v1/completions); use a server that does (sparsefast serve, vLLM)")
        text, expected = choice.get("text"), tokenizer.decode(ids)
        if not isinstance(text, str) or not text.startswith(expected):
            raise ValueError(f"the server at {self.base_url} (model {self.model!r}) echoes {text!r} for the ids of "
                             f"{expected!r}: it tokenizes differently; give sparsefast eval the model it serves")

    def _complete(self, prompts: list[list[int]], *, probe: bool = False) -> list[dict]:
        """The choices of one scoring request, in prompt order."""
        body = {"model": self.model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0}
        try:
            out = self._request("/v1/completions", body)
        except ValueError as exc:
            if probe and "answered 400" in str(exc):
                raise ValueError(f"the server at {self.base_url} does not score prompts ({exc}); use a server that "
                                 "returns prompt logprobs with echo (sparsefast serve, vLLM)") from None
            raise
        choices = out.get("choices") if isinstance(out, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise ValueError(f"{self.base_url}/v1/completions answered {len(choices or [])} choices for "
                             f"{len(prompts)} prompts; it does not take a list of token-id prompts")
        return sorted(choices, key=lambda c: c.get("index", 0))

    # ---- scoring ------------------------------------------------------------------------------------------------
    def score(self, sequences: list[tuple[list[int], int]], progress: bool = True) -> list[Loglikelihood]:
        """Loglikelihood of ``ids[-n:]`` given ``ids[:-n]`` for each ``(ids, n)``, `prompts_per_request` prompts per
        request, longest first (as lm-eval's requests are ordered)."""
        if self.model is None:
            raise RuntimeError("ServerScorer.score before connect(); call connect() and check(tokenizer) first")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[Loglikelihood] = [Loglikelihood(0.0, False)] * len(sequences)
        bar = tqdm(total=len(order), desc="loglikelihood (server)", unit="req", disable=not progress)
        for start in range(0, len(order), self.prompts_per_request):
            batch = order[start:start + self.prompts_per_request]
            choices = self._complete([sequences[i][0] for i in batch])
            for i, choice in zip(batch, choices):
                ids, n = sequences[i]
                results[i] = _continuation_loglikelihood(choice, len(ids), n, self.base_url)
            bar.update(len(batch))
        bar.close()
        return results


def _continuation_loglikelihood(choice: dict, n_ids: int, n: int, where: str) -> Loglikelihood:
    """Sum of the last `n` prompt tokens' logprobs of an echoed choice (its prompt has `n_ids` tokens)."""
    lp = choice.get("logprobs") or {}
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    if len(values) < n_ids or len(tops) < n_ids:
        raise ValueError(f"{where} returned {len(values)} prompt logprobs for a prompt of {n_ids} tokens")
    span = range(n_ids - n, n_ids)
    return Loglikelihood(sum(float(values[j]) for j in span),
                         all(values[j] == max(tops[j].values()) for j in span))


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of an OpenAI error body, else the start of the body."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except OSError:
        return str(exc.reason)
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return raw.strip().splitlines()[0][:300] if raw.strip() else str(exc.reason)


def _http_error(base: str, path: str, status: int, message: str) -> Exception:
    if status == 401:
        return ValueError(f"the server at {base} wants an API key (401); pass --api-key or set $SPARSEFAST_API_KEY")
    if status == 404:
        return ValueError(f"{base}{path} answered 404; --server takes the server's base URL "
                          "(http://HOST:PORT) of an OpenAI-compatible server")
    if status == 503:
        return ConnectionError(f"the server at {base} is not ready (503: {message}); wait until its /health is 200")
    return ValueError(f"{base}{path} answered {status}: {message}")
