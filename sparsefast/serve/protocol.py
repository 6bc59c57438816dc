"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Field names and defaults follow OpenAI's /v1/completions and /v1/chat/completions (vLLM's
`entrypoints/openai/protocol.py` is the field's reference), plus vLLM's sampling extensions `top_k`, `ignore_eos`,
`repetition_penalty` and `min_tokens`. `n` samples per prompt; `response_format` json_object / json_schema
(sparsefast.serve.structured). Fields OpenAI defines but this server does not implement (tools, tool_choice,
best_of, suffix, echo with stream) are accepted only at their "off" value and rejected otherwise with a 400 that
names the field, instead of being silently ignored.
Unknown fields are ignored, as OpenAI's SDK sends extras through `extra_body`.

Requests are strict where OpenAI's API is: pydantic's strict mode (no "16" or true for an integer, no "yes" for a
boolean; an integer is still a number), finite numbers only, and every text that reaches the tokenizer must be valid
Unicode (Python's JSON reader turns an escaped lone surrogate "\\ud800", and the raw bytes ED A0 80, into a string
that UTF-8 cannot encode). Stop strings are bounded as sparsefast.serve.sampling states. The error messages are built
from pydantic's errors by sparsefast.serve.errors.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from sparsefast.serve.logprobs import MAX_LOGPROBS
from sparsefast.serve.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    invalid_unicode,
)


def _valid_unicode(text: str) -> str:
    if (why := invalid_unicode(text)) is not None:
        raise ValueError(f"contains {why}, which is not valid Unicode; send UTF-8 text")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # a string the tokenizer can encode
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
_STRICT = ConfigDict(extra="ignore", strict=True)
MAX_N = 128  # OpenAI's bound on n


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. "cmpl-3f2a...": prefix + 24 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's {"name", "description", "schema", "strict"}. The output always follows
    the schema here (strict or not); `name` is optional (OpenAI requires it, vLLM does not)."""
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: {"type": "text"} (the default), {"type": "json_object"} (any JSON object), or
    {"type": "json_schema", "json_schema": {...}}."""
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema: set it exactly when type is "json_schema" (e.g. {"type": "json_schema", '
                             '"json_schema": {"name": "answer", "schema": {...}}})')
        return self


class GenerationRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model, sampling, stop strings, streaming, and
    the OpenAI options this server rejects unless off. Ranges are OpenAI's (temperature in [0, 2], top_p in (0, 1]).
    Each endpoint's request adds its prompt and its max_tokens (the defaults differ)."""
    model_config = _STRICT

    model: str
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="vLLM extension: keep the k most likely tokens; 0 = off")
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate exactly max_tokens (benchmarks)")
    n: int = Field(1, ge=1, le=MAX_N, description="samples per prompt (the engine also caps it at its batch)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
                                      description="vLLM extension: CTRL's penalty over prompt + output; 1 = off")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no EOS before this many tokens")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "GenerationRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed together with stream=true")
        return self

    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; its keys are token ids written as strings (OpenAI's shape)."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: keys must be token ids as strings (e.g. \"50256\"), got {key!r}")
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a list of either (one choice per prompt,
    `index` in prompt order). `logprobs` k: each token's logprob and its k most likely alternatives (legacy
    completions shape); `echo`: the prompt is returned before the completion (with its tokens' logprobs when
    `logprobs` is set: scoring, as evaluation harnesses use it); `max_tokens` 0 only with `echo`."""
    prompt: (Text | Annotated[list[int], Field(min_length=1)] | Annotated[list[Text], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _reject_unimplemented_completion(self) -> "CompletionRequest":
        for name, bad in {"best_of": self.best_of not in (None, 1), "suffix": self.suffix is not None}.items():
            if bad:
                raise ValueError(f"{name}: not supported by this server; leave it unset")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it is allowed with echo=true (return, and with "
                             "logprobs score, the prompt)")
        if self.stream and len(self.prompts()) > 1:
            raise ValueError("prompt: a streamed request takes one prompt; send several prompts without stream, or "
                             "one request per prompt")
        if self.stream and self.echo:
            raise ValueError("echo: not supported with stream=true by this server; send it without stream")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class ContentPart(BaseModel):
    """One part of a message's list content; only {"type": "text", "text": ...} is served."""
    model_config = _STRICT

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message text; list content may only hold text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages: content part of type {part.type!r} is not supported; "
                                 "send text parts only")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _reject_unimplemented_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true; set it, or leave top_logprobs unset")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server; leave it unset")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported by this server; leave it unset")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    """What every choice carries; each kind adds its payload (text, message or delta) after these fields."""
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class _ResponseObject(BaseModel):
    """The head of every completion object; each kind fixes `object` (its field order stays OpenAI's) and adds its
    choices and usage."""
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(_Choice):
    logprobs: dict[str, Any] | None = None  # sparsefast.serve.logprobs.completion_logprobs
    text: str
    finish_reason: str | None


class CompletionResponse(_ResponseObject):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    logprobs: dict[str, Any] | None = None  # sparsefast.serve.logprobs.chat_logprobs
    message: ResponseMessage
    finish_reason: str | None


class ChatCompletionResponse(_ResponseObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: DeltaMessage


class ChatCompletionChunk(_ResponseObject):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sparsefast"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
