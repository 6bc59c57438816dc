"""The server's endpoints, as module-level handlers on two routers that `create_app` mounts.

`router`: GET and HEAD /health (503 {"status": "loading"|"error"} until the model is loaded, then 200) and GET
/metrics (Prometheus text); neither needs the API key. `openai_router` (/v1, API key checked when one is configured):
GET /v1/models, GET /v1/models/{id} (404 for any other id), POST /v1/completions and POST /v1/chat/completions
(the tokenizer's chat template, or the server's `--chat-template`), each answering in one JSON body or, with
`stream: true`, as server-sent events.

Handlers reach the app's `ServerState` (config, metrics, engine, tokenizer) through the `server_state` dependency.
They never block the event loop: tokenization and chat templating run in a worker thread, and the engine's streams
are read with `async for`. A request is checked in this order: API key, body, model name, model loaded, prompt,
limits; the first failure answers with OpenAI's error body (sparsefast.serve.errors).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from sparsefast.serve import protocol as P
from sparsefast.serve.engine_client import EngineClient, EngineClosedError, QueueFullError, TokenStream
from sparsefast.serve.errors import APIError
from sparsefast.serve.metrics import CONTENT_TYPE
from sparsefast.serve.sampling import SamplingParams
from sparsefast.serve.state import ServerConfig, ServerState
from sparsefast.serve.streaming import EventStream, chat_chunks, collect_text, completion_chunks, event_usage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def server_state(request: Request) -> ServerState:
    """The `ServerState` that `create_app` put on the app."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


def require_api_key(request: Request, state: State) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (when the server has a key)."""
    key = state.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


router = APIRouter()
openai_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(state: State) -> Response:
    if state.engine is not None:
        return JSONResponse({"status": "ok"})
    status = "error" if state.error else "loading"
    return JSONResponse({"status": status, **({"error": state.error} if state.error else {})}, status_code=503)


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@openai_router.get("/models")
async def list_models(state: State) -> P.ModelList:
    return P.ModelList(data=[_model_card(state)])


@openai_router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> P.ModelCard:
    _check_model(model_id, state.config)
    return _model_card(state)


def _model_card(state: ServerState) -> P.ModelCard:
    engine, _ = state.require_loaded()
    return P.ModelCard(id=state.config.model_name, max_model_len=engine.max_model_len)


@openai_router.post("/completions")
async def create_completion(body: P.CompletionRequest, request: Request, state: State) -> Response:
    _check_model(body.model, state.config)
    engine, tokenizer = state.require_loaded()
    if isinstance(body.prompt, str):
        prompt_ids = await anyio.to_thread.run_sync(_encode_text, tokenizer, body.prompt)
    else:
        prompt_ids = _check_ids(body.prompt, tokenizer)
    stream = _submit(engine, state.config, prompt_ids, body, body.max_tokens, "prompt")
    request_id, model = P.new_id("cmpl"), state.config.model_name
    if body.stream:
        return EventStream(stream, completion_chunks(stream, request_id, model, body.include_usage()), state.metrics)
    text, last = await collect_text(request, stream, state.metrics)
    return JSONResponse(P.CompletionResponse(
        id=request_id, model=model, choices=[P.CompletionChoice(text=text, finish_reason=last.finish_reason)],
        usage=event_usage(last)).model_dump())


@openai_router.post("/chat/completions")
async def create_chat_completion(body: P.ChatCompletionRequest, request: Request, state: State) -> Response:
    _check_model(body.model, state.config)
    engine, tokenizer = state.require_loaded()
    prompt_ids = await anyio.to_thread.run_sync(_encode_chat, tokenizer, body.messages, state.config.chat_template)
    stream = _submit(engine, state.config, prompt_ids, body, body.requested_max_tokens(), "messages")
    request_id, model = P.new_id("chatcmpl"), state.config.model_name
    if body.stream:
        return EventStream(stream, chat_chunks(stream, request_id, model, body.include_usage()), state.metrics)
    text, last = await collect_text(request, stream, state.metrics)
    return JSONResponse(P.ChatCompletionResponse(
        id=request_id, model=model, usage=event_usage(last),
        choices=[P.ChatChoice(message=P.ResponseMessage(content=text), finish_reason=last.finish_reason)],
    ).model_dump())


# ----- request checks and prompt preparation -----------------------------------------------------------------------

def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def _encode_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise APIError(400, "prompt: tokenizes to no tokens; send a non-empty prompt", param="prompt")
    return ids


def _check_ids(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab}); send valid ids",
                       param="prompt", code="invalid_value")
    return list(ids)


def _encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[P.ChatMessage], template: str | None) -> list[int]:
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions or start "
                            "the server with --chat-template FILE", param="messages", code="no_chat_template")
    try:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc
    out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        chat_template=template)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def _submit(engine: EngineClient, config: ServerConfig, prompt_ids: list[int], body: P.GenerationRequest,
            max_tokens: int | None, prompt_field: str) -> TokenStream:
    """Build SamplingParams (the server's limits applied) and submit; maps engine errors to HTTP errors.

    max_tokens None (OpenAI's default for chat) generates up to the end of the context, capped by the server's
    max_tokens_limit; an explicit max_tokens above that limit is a 400."""
    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"{prompt_field}: {len(prompt_ids)} prompt tokens leave no room in the "
                            f"{engine.max_model_len}-token context; shorten the prompt", param=prompt_field,
                       code="context_length_exceeded")
    limit = config.max_tokens_limit
    if max_tokens is None:
        max_tokens = room if limit is None else min(room, limit)
    elif limit is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {limit}; ask for fewer",
                       param="max_tokens", code="invalid_value")
    try:
        stops = body.stop_strings()
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop=stops, ignore_eos=body.ignore_eos).validate()
        return engine.submit(prompt_ids, params)
    except QueueFullError as exc:
        raise APIError(429, f"server busy: {engine.max_queue} requests already queued ({exc}); retry later",
                       code="queue_full") from exc
    except EngineClosedError as exc:
        raise APIError(503, f"server is shutting down ({exc})", code="engine_closed") from exc
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc
