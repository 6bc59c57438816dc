"""OpenAI-style error bodies and the ASGI guard in front of the app.

Every error the server returns has OpenAI's body {"error": {"message", "type", "param", "code"}}: bad parameters
400 (pydantic's errors as "<field path>: <problem>", param the top-level field, code "invalid_type", "invalid_value"
or "missing_required_parameter"), bad key 401, unknown model or route 404, body too large 413, queue full 429, model
loading / engine closed 503, anything unexpected 500 with a one-line message (the traceback goes to the log, never
to the client).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("sparsefast.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): ")
UNMATCHED_PATH = "(unmatched)"  # what RequestGuard reports for a request no route of the app serves


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raised by handlers, rendered by `error_response`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    @classmethod
    def bad_value(cls, exc: ValueError) -> "APIError":
        """400 from a ValueError whose message starts with "<field>: " (SamplingParams.validate, engine.submit)."""
        message = str(exc)
        match = _FIELD_PREFIX.match(message)
        return cls(400, message, param=match.group(1) if match else None, code="invalid_value")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.status, err.message, param=err.param, code=err.code, type=err.type),
                        status_code=err.status, headers=headers)


# pydantic's type errors, as the JSON type the field expects
_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "bool_type": "a boolean",
             "float_type": "a number", "string_type": "a string", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object", "none_required": "null"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _json_kind(value: Any) -> str:
    """The JSON type of a parsed value, as a message names it ("a boolean", "an array", ...)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: Any) -> str:
    """A value for a message: repr (it escapes what JSON could not carry, e.g. lone surrogates), cut to 40 chars."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _path(loc: tuple) -> str:
    """"messages[0].content" from pydantic's location, without the union member tags it inserts ("str",
    "list[int]", "function-after[...]", model class names): our field names are lower-case identifiers."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part[:1].islower() and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
    return out


def _problem(error: dict) -> tuple[str, str]:
    """(what is wrong, OpenAI-style code) for one pydantic error."""
    kind, ctx, value = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_json_kind(value)}", "invalid_type"
    if kind == "missing":
        return "required; add it to the request", "missing_required_parameter"
    if kind == "finite_number":
        return f"must be a finite number, got {_shown(value)}", "invalid_value"
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {limit}, got {_shown(value)}", "invalid_value"
    if kind in ("too_short", "string_too_short"):
        n, unit = ctx.get("min_length", 1), "items" if kind == "too_short" else "characters"
        return ("must not be empty" if n == 1 else f"must have at least {n} {unit}"), "invalid_value"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}", "invalid_value"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters, got {len(value)}", "invalid_value"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_shown(value)}", "invalid_value"
    return str(error.get("msg", "invalid value")).removeprefix("Value error, "), "invalid_value"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The first invalid field's problem as (one-line message "<path>: <problem>", top-level field, code).

    A union (e.g. prompt: string | token ids | strings) reports one error per member; the member that got furthest
    into the value (largest list index) says what is wrong, a constraint error before a type error; when every member
    failed on the type alone, the message lists the types the field accepts."""
    errors = [{**e, "loc": tuple(p for p in e.get("loc", ()) if p != "body")} for e in exc.errors()]
    if not errors:
        return "invalid request body", None, "invalid_value"
    if errors[0].get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None, "invalid_json"
    field = errors[0]["loc"][0] if errors[0]["loc"] else None
    if field is None:  # a model-level check (a ValueError whose message names its field)
        message, code = _problem(errors[0])
        match = _FIELD_PREFIX.match(message)
        return message, match.group(1) if match else None, code
    candidates = [e for e in errors if e["loc"][:1] == (field,)]
    best = max(candidates, key=lambda e: ([p for p in e["loc"] if isinstance(p, int)], e["type"] not in _EXPECTED))
    path = _path(best["loc"]) or str(field)
    same_place = [e for e in candidates if _path(e["loc"]) == path]
    if all(e["type"] in _EXPECTED for e in same_place) and len(same_place) > 1:
        expected = " or ".join(dict.fromkeys(_EXPECTED[e["type"]] for e in same_place))
        return f"{path}: expected {expected}, got {_json_kind(best.get('input'))}", str(field), "invalid_type"
    problem, code = _problem(best)
    return f"{path}: {problem}", str(field), code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}; see the server log"))


class RequestGuard:
    """Pure ASGI middleware: body size limit (413 before the app sees the request) and per-request counting.

    The body is read here (up to `max_body_bytes`) and replayed to the app; later `receive` calls go to the server,
    so the app still sees `http.disconnect` when a client goes away mid-stream (a BaseHTTPMiddleware would hide it).
    `on_finished(path, status)` is called once per HTTP request, with the path of the app's route that served it (a
    413 sent before routing: its path if a route with that path has served a request before), or UNMATCHED_PATH: the
    raw path is the client's to choose, and a metric series per distinct path would let one client grow the server's
    memory without bound.
    """

    def __init__(self, app: Callable, *, max_body_bytes: int, on_finished: Callable[[str, int], None]) -> None:
        self.app, self.max_body_bytes, self.on_finished = app, max_body_bytes, on_finished
        self._route_paths: set[str] = set()  # paths of the routes that have served a request (as many as routes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            too_large = self._declared_too_large(scope)
            replay: list[dict] = []
            if not too_large:
                total, more = 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # disconnected while sending the body
                        replay.append(message)
                        break
                    total += len(message.get("body", b""))
                    if total > self.max_body_bytes:
                        too_large = True
                        break
                    replay.append(message)
                    more = message.get("more_body", False)
            if too_large:
                await self._send_413(counting_send)
                return

            async def replaying_receive() -> dict:
                return replay.pop(0) if replay else await receive()

            await self.app(scope, replaying_receive, counting_send)
        finally:
            self.on_finished(self._route_path(scope), status["code"])

    def _route_path(self, scope: dict) -> str:
        route = getattr(scope.get("route"), "path", None)  # set by the app's router when a route matched
        if route is not None:
            self._route_paths.add(route)
            return route
        path = scope.get("path", "")
        return path if path in self._route_paths else UNMATCHED_PATH

    def _declared_too_large(self, scope: dict) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    return int(value) > self.max_body_bytes
                except ValueError:
                    return False
        return False

    async def _send_413(self, send: Callable) -> None:
        body = json.dumps(error_body(413, f"request body larger than {self.max_body_bytes} bytes; send a smaller "
                                          "request or start the server with a larger --max-body-bytes",
                                     code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
