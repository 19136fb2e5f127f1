"""The FastAPI app: OpenAI routes, tokenizer routes, health and metrics around one AsyncEngine.

Request bodies are read and validated by hand (``serving.read_body``) rather than by FastAPI's
body parameters, so that every malformed body, whatever its content type, gets a 400 in OpenAI's
shape with the offending field named; the OpenAPI document still describes each body, for
clients and for schema fuzzing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from kestrel.engine.async_engine import AsyncEngine
from kestrel.server.chat import chat_prompt, create_chat_completion
from kestrel.server.completions import create_completion
from kestrel.server.errors import GuardMiddleware, bad_request, install_error_handlers
from kestrel.server.metrics import CONTENT_TYPE, ServerMetrics
from kestrel.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kestrel.server.serving import ServerState, read_body

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 4 << 20


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def build_app(engine: AsyncEngine, served_model_name: str | list[str],
              api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """An app serving ``engine``; its lifespan starts and stops the engine loop.

    ``metrics`` must be the listener the AsyncEngine was built with (or None to make one and
    attach it here).
    """
    if metrics is None:
        metrics = ServerMetrics()
        engine.listener = metrics
    metrics.attach_engine(lambda: engine.snapshot, lambda: engine.healthy)
    names = [served_model_name] if isinstance(served_model_name, str) else served_model_name
    state = ServerState(engine, list(names), metrics, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="Kestrel", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM server")
    app.state.kestrel = state
    install_error_handlers(app)
    app.include_router(_openai_routes())
    app.include_router(_tokenizer_routes())
    app.include_router(_ops_routes())
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       on_error=metrics.count_error)
    _install_openapi(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                           DetokenizeRequest], names, secured=api_key is not None)
    return app


def _openai_routes() -> APIRouter:
    r = APIRouter()
    r.add_api_route("/v1/completions", create_completion, methods=["POST"],
                    openapi_extra=_body_doc(CompletionRequest), summary="Create a completion")
    r.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                    openapi_extra=_body_doc(ChatCompletionRequest),
                    summary="Create a chat completion")

    @r.get("/v1/models", summary="List the served model")
    async def list_models(request: Request) -> JSONResponse:
        s: ServerState = request.app.state.kestrel
        data = [{"id": name, "object": "model", "created": s.created, "owned_by": "kestrel",
                 "root": s.model_name, "max_model_len": s.engine.max_model_len}
                for name in s.model_names]
        return JSONResponse({"object": "list", "data": data})

    return r


def _tokenizer_routes() -> APIRouter:
    r = APIRouter()

    async def tokenize(request: Request) -> JSONResponse:
        s: ServerState = request.app.state.kestrel
        req: TokenizeRequest = await read_body(request, TokenizeRequest)
        s.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'")
        if req.messages is not None:
            ids = await chat_prompt(s, req.messages, req.add_generation_prompt)
        else:
            ids = await _encode(s, req.prompt or "", req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": s.engine.max_model_len,
                             "tokens": ids})

    async def detokenize(request: Request) -> JSONResponse:
        s: ServerState = request.app.state.kestrel
        req: DetokenizeRequest = await read_body(request, DetokenizeRequest)
        s.check_model(req.model)
        vocab = s.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}); got {bad[:5]}", "tokens")
        tok = _tokenizer_or_400(s)
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    r.add_api_route("/tokenize", tokenize, methods=["POST"], summary="Text → token ids",
                    openapi_extra=_body_doc(TokenizeRequest))
    r.add_api_route("/detokenize", detokenize, methods=["POST"], summary="Token ids → text",
                    openapi_extra=_body_doc(DetokenizeRequest))
    return r


def _tokenizer_or_400(s: ServerState) -> Any:
    if s.engine.tokenizer is None:
        raise bad_request("this model has no tokenizer (random-weight preset)")
    return s.engine.tokenizer


async def _encode(s: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    _tokenizer_or_400(s)
    from kestrel.server.errors import engine_error

    try:
        return await s.engine.call(
            lambda e: list(e.tokenizer.encode(text, add_special_tokens=add_special_tokens)))
    except Exception as e:  # noqa: BLE001 - mapped to the answer the client gets
        raise engine_error(e) from None


def _ops_routes() -> APIRouter:
    r = APIRouter()

    @r.get("/health", summary="200 while the engine loop runs; 503 once it died or drains")
    async def health(request: Request) -> JSONResponse:
        engine: AsyncEngine = request.app.state.kestrel.engine
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": engine.status}, status_code=503,
                            headers={"Retry-After": "1"})

    @r.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.kestrel.metrics.render(), media_type=CONTENT_TYPE)

    return r


def _install_openapi(app: FastAPI, models: list[type[BaseModel]], names: list[str],
                     secured: bool) -> None:
    """Publish the hand-validated bodies' schemas (and the bearer scheme) in /openapi.json.

    ``model`` is documented as the served names, the only values that do not get a 404.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            if "model" in schema.get("properties", {}):
                schema["properties"]["model"]["anyOf"] = [{"type": "string", "enum": names},
                                                          {"type": "null"}]
            schemas[model.__name__] = schema
        if secured:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                               "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
