"""What the HTTP app holds and its route handlers read: the server's settings, its metrics, and the engine and
tokenizer once the loader thread has them. `create_app` puts one `ServerState` on `app.state.server`; handlers reach
it through the `server_state` dependency (sparsefast.serve.routes), never through closures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsefast.serve.engine_client import EngineClient
from sparsefast.serve.errors import APIError
from sparsefast.serve.metrics import ServerMetrics
from sparsefast.serve.structured import GrammarCompiler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP layer (the engine has its own: max_batch, max_queue, max_model_len).

    model_name: the id served at /v1/models and required in each request's `model` field.
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`.
    max_tokens_limit: upper bound on a request's max_tokens (None: only the context bounds it).
    max_body_bytes: request bodies larger than this get 413.
    chat_template: a Jinja chat template overriding the tokenizer's (needed for tokenizers without one).
    allowed_origins: browser origins (scheme://host[:port], or "*") allowed to call the server cross-origin (CORS,
        Starlette's CORSMiddleware: preflights answered, no credentials); empty: no CORS headers (the default).
    """
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = 1 << 20
    chat_template: str | None = None
    allowed_origins: tuple[str, ...] = ()


class ServerState:
    """The config and metrics of one app, plus the engine (started) and tokenizer once loaded, or the load error.

    `engine`, `tokenizer` and `error` are written once, by the loader thread (sparsefast.serve.app).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: EngineClient | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.error: str | None = None
        self._grammars: GrammarCompiler | None = None
        # the gauges read the engine at scrape time: 0 while it loads
        self.metrics = ServerMetrics(lambda: self.engine.queue_depth if self.engine is not None else 0,
                                     lambda: self.engine.running if self.engine is not None else 0)

    def require_loaded(self) -> tuple[EngineClient, PreTrainedTokenizerBase]:
        """(engine, tokenizer), or APIError 503 while the model loads or after its load failed."""
        if self.engine is None or self.tokenizer is None:
            why = f"model failed to load: {self.error}" if self.error else "model is still loading; retry shortly"
            raise APIError(503, why, code="model_not_ready")
        return self.engine, self.tokenizer

    def grammars(self) -> GrammarCompiler:
        """The response-format compiler for the loaded tokenizer (made on first use); APIError 503 until loaded."""
        _, tokenizer = self.require_loaded()
        if self._grammars is None:
            self._grammars = GrammarCompiler(tokenizer)  # a race makes two, equal: harmless
        return self._grammars
