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

import dataclasses
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from sparsefast.serve import protocol as P
from sparsefast.serve.engine_client import EngineClient, EngineClosedError, QueueFullError, TokenEvent, TokenStream
from sparsefast.serve.errors import APIError
from sparsefast.serve.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from sparsefast.serve.metrics import CONTENT_TYPE
from sparsefast.serve.sampling import SamplingParams
from sparsefast.serve.state import ServerConfig, ServerState
from sparsefast.serve.streaming import EventStream, chat_chunks, collect, completion_chunks, samples_usage
from sparsefast.serve.structured import Grammar

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
    prompts = [await anyio.to_thread.run_sync(_encode_text, tokenizer, p) if isinstance(p, str)
               else _check_ids(p, tokenizer) for p in body.prompts()]
    k = body.logprobs
    # echo + logprobs scores the prompt (prompt logprobs from the prefill); max_tokens 0 always needs the prefill's
    # scoring path, which is the one the engine runs without generating
    scoring = k if body.echo and k is not None else (0 if body.max_tokens == 0 else None)
    grammar = await _compile_response_format(state, body)
    streams = _submit_all(engine, state.config, prompts, body, body.max_tokens, "prompt", logprobs=k,
                          prompt_logprobs=scoring, grammar=grammar)
    request_id, model = P.new_id("cmpl"), state.config.model_name
    if body.stream:
        texts = None if k is None else TokenTexts(tokenizer, prompts[0])
        return EventStream(streams, completion_chunks(streams, request_id, model, body.include_usage(), texts),
                           state.metrics)
    choices, lasts = [], []
    try:
        # choice index = prompt index * n + sample index (OpenAI's order)
        texts_in = body.prompts()
        for index, stream in enumerate(streams):
            prompt, ids = texts_in[index // body.n], prompts[index // body.n]
            text, events = await collect(request, stream, state.metrics, count_prompt=index % body.n == 0)
            lasts.append(events[-1])
            choices.append(_completion_choice(index, text, events, prompt, ids, body, tokenizer))
    finally:
        for stream in streams:
            stream.cancel()  # idempotent: the choices not read yet when one failed or the client left
    return JSONResponse(P.CompletionResponse(id=request_id, model=model, choices=choices,
                                             usage=samples_usage(lasts, body.n)).model_dump())


def _completion_choice(index: int, text: str, events: list[TokenEvent], prompt: str | list[int], ids: list[int],
                       body: P.CompletionRequest, tokenizer: PreTrainedTokenizerBase) -> P.CompletionChoice:
    """One prompt's choice: its text (after the prompt's with echo) and, when asked, the logprobs of its tokens (the
    prompt's first with echo). ids: the prompt's token ids."""
    prefix = "" if not body.echo else prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    logprobs = None
    if body.logprobs is not None:
        entries = [e for ev in events for e in ev.logprobs]
        if body.echo:
            entries = [*(events[0].prompt_logprobs or ()), *entries]
        logprobs = completion_logprobs(entries, TokenTexts(tokenizer, () if body.echo else ids))
    return P.CompletionChoice(index=index, text=prefix + text, logprobs=logprobs,
                              finish_reason=events[-1].finish_reason)


@openai_router.post("/chat/completions")
async def create_chat_completion(body: P.ChatCompletionRequest, request: Request, state: State) -> Response:
    _check_model(body.model, state.config)
    engine, tokenizer = state.require_loaded()
    prompt_ids = await anyio.to_thread.run_sync(_encode_chat, tokenizer, body.messages, state.config.chat_template)
    k = (body.top_logprobs or 0) if body.logprobs else None
    grammar = await _compile_response_format(state, body)
    streams = _submit_all(engine, state.config, [prompt_ids], body, body.requested_max_tokens(), "messages",
                          logprobs=k, grammar=grammar)
    request_id, model = P.new_id("chatcmpl"), state.config.model_name
    texts = None if k is None else TokenTexts(tokenizer, prompt_ids)
    if body.stream:
        return EventStream(streams, chat_chunks(streams, request_id, model, body.include_usage(), texts),
                           state.metrics)
    choices, lasts = [], []
    try:
        for index, stream in enumerate(streams):
            text, events = await collect(request, stream, state.metrics, count_prompt=index == 0)
            lasts.append(events[-1])
            logprobs = None if texts is None else chat_logprobs([e for ev in events for e in ev.logprobs], texts)
            choices.append(P.ChatChoice(index=index, message=P.ResponseMessage(content=text), logprobs=logprobs,
                                        finish_reason=events[-1].finish_reason))
    finally:
        for stream in streams:
            stream.cancel()
    return JSONResponse(P.ChatCompletionResponse(id=request_id, model=model, usage=samples_usage(lasts, body.n),
                                                 choices=choices).model_dump())


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


async def _compile_response_format(state: ServerState, body: P.GenerationRequest) -> Grammar | None:
    """The request's response_format compiled (in a worker thread), or None without one; a 400 naming
    response_format when it cannot be."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
    try:
        return await anyio.to_thread.run_sync(state.grammars().compile, fmt.type, schema)
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc


def _submit_all(engine: EngineClient, config: ServerConfig, prompts: list[list[int]], body: P.GenerationRequest,
                max_tokens: int | None, prompt_field: str, *, logprobs: int | None = None,
                prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> list[TokenStream]:
    """Build each prompt's SamplingParams (the server's limits applied) and submit them all, `body.n` samples per
    prompt, or none: a prompt that is refused cancels the ones already queued. Engine errors become HTTP errors.
    Returns the streams in choice order (prompt index * n + sample index).

    max_tokens None (OpenAI's default for chat) generates up to the end of the context, capped by the server's
    max_tokens_limit; an explicit max_tokens above that limit is a 400. A seeded request's sample j draws with seed
    + j (vLLM's rule), so its n samples differ and each is reproducible."""
    params = [_params(engine, config, ids, body, max_tokens, prompt_field, logprobs, prompt_logprobs, grammar)
              for ids in prompts]
    streams: list[TokenStream] = []
    try:
        for ids, p in zip(prompts, params):
            samples = [p if p.seed is None else dataclasses.replace(p, seed=(p.seed + j) % 2**63)
                       for j in range(body.n)]
            streams.extend(engine.submit_samples(ids, samples))
    except BaseException as exc:
        for stream in streams:
            stream.cancel()
        if isinstance(exc, QueueFullError):
            raise APIError(429, f"server busy: {engine.max_queue} requests already queued ({exc}); retry later",
                           code="queue_full") from exc
        if isinstance(exc, EngineClosedError):
            raise APIError(503, f"server is shutting down ({exc})", code="engine_closed") from exc
        if isinstance(exc, ValueError):
            raise APIError.bad_value(exc) from exc
        raise
    return streams


def _params(engine: EngineClient, config: ServerConfig, prompt_ids: list[int], body: P.GenerationRequest,
            max_tokens: int | None, prompt_field: str, logprobs: int | None, prompt_logprobs: int | None,
            grammar: Grammar | None) -> SamplingParams:
    room = engine.max_model_len - len(prompt_ids)
    if room < (0 if max_tokens == 0 else 1):
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
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                              logit_bias=body.logit_bias_ids(), grammar=grammar).validate()
    except ValueError as exc:
        raise APIError.bad_value(exc) from exc
