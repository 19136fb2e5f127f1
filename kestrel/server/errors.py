"""Errors in OpenAI's JSON shape, and the two guards in front of every route: auth and body size.

Every failure a client can cause maps to a 4xx with a message naming what was wrong; a 500 means
a bug in Kestrel. The guards are plain ASGI middleware so a wrong key or an oversized body is
refused before any of it is read into memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kestrel.engine.async_engine import EngineDeadError, EngineStoppedError, RequestAbortedError
from kestrel.engine.engine import QueueFullError
from kestrel.server.protocol import error_body

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# Paths anyone may read: liveness probes and scrapers carry no key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})


class APIError(Exception):
    """An error answer: status, OpenAI error type, message, optional param and headers."""

    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.err_type, self.status, self.param),
                            status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", headers={"Retry-After": RETRY_AFTER_S})


def engine_error(exc: BaseException) -> APIError:
    """Map what AsyncEngine.add_request / a stream can raise to the answer the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return unavailable(f"server is overloaded: {exc}; retry later")
    if isinstance(exc, (EngineDeadError, EngineStoppedError, RequestAbortedError)):
        return unavailable(str(exc))
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI/Starlette can raise comes out in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        err = APIError(exc.status_code, str(exc.detail), kinds.get(exc.status_code,
                                                                   "invalid_request_error"),
                       headers=getattr(exc, "headers", None))
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return bad_request(f"{loc}: {first.get('msg', 'invalid request')}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return engine_error(exc).response()


def _json_reply(status: int, message: str, err_type: str,
                headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps(error_body(message, err_type, status)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """API key check (constant time) and request body size limit, before the app sees anything;
    and, seeing every answer go out, the count of error answers by status (``on_error``)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 on_error: Callable[[int], None]) -> None:
        self.app = app
        # Compare digests: equal length whatever was sent, so timing reveals nothing.
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body = max_body_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        on_error, started = self.on_error, False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    on_error(message["status"])
            await send(message)

        try:
            await self._guard(scope, receive, counting_send)
        except Exception:
            if not started:  # Starlette's outermost layer answers it with a 500
                on_error(500)
            raise

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key_digest is not None and scope["path"] not in OPEN_PATHS \
                and not self._authorized(scope):
            await self._reply(send, 401, "missing or invalid API key: send "
                              "'Authorization: Bearer <key>'", "authentication_error",
                              {"WWW-Authenticate": "Bearer"})
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._reply(send, 413, f"request body is {length} bytes; the limit is "
                              f"{self.max_body} bytes", "invalid_request_error")
            return
        await self._call_limited(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        got = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                got = value[7:].strip() if value[:7].lower() == b"bearer " else b""
            elif name == b"x-api-key" and not got:
                got = value.strip()
        assert self.key_digest is not None
        return hmac.compare_digest(hashlib.sha256(got).digest(), self.key_digest)

    async def _call_limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count body bytes as they arrive (chunked uploads carry no Content-Length)."""
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reply(send, 413, f"request body exceeds the limit of "
                                  f"{self.max_body} bytes", "invalid_request_error")

    @staticmethod
    async def _reply(send: Send, status: int, message: str, err_type: str,
                     headers: dict[str, str] | None = None) -> None:
        start, body = _json_reply(status, message, err_type, headers)
        await send(start)
        await send(body)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parse_body(raw: bytes, model: Any) -> Any:
    """Bytes → a validated request model, or a 400 naming the problem."""
    from pydantic import ValidationError

    from kestrel.server.protocol import describe_validation_error

    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (bad byte at offset {e.start})"
                          ) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        message, param = describe_validation_error(e)
        raise bad_request(message, param) from None
