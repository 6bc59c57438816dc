"""OpenAI-style error bodies and the ASGI guard in front of the app.

Every error the server returns has OpenAI's body {"error": {"message", "type", "param", "code"}}: bad parameters
(pydantic validation included) 400, bad key 401, unknown model or route 404, body too large 413, queue full 429,
model loading / engine closed 503, anything unexpected 500 with a one-line message (the traceback goes to the log,
never to the client).
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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as (one-line message, offending field)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None
    if loc:
        # the top-level field names the problem; deeper parts of the location are pydantic's union member names
        return f"{loc[0]}: {msg}", loc[0]
    match = _FIELD_PREFIX.match(msg)
    return msg, match.group(1) if match else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"))

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
    `on_finished(path, status)` is called once per HTTP request.
    """

    def __init__(self, app: Callable, *, max_body_bytes: int, on_finished: Callable[[str, int], None]) -> None:
        self.app, self.max_body_bytes, self.on_finished = app, max_body_bytes, on_finished

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
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
            self.on_finished(path, status["code"])

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
