"""The FastAPI app: routes, body parsing, API-key check, and the glue from protocol to the serving modules.

Bodies are parsed by hand (content type, JSON, then the pydantic model) rather than through FastAPI's signature
injection, so that every failure is an OpenAI-style 400 with vLLM's message and never FastAPI's bare 422. The API
key guards the `/v1` routes only, as in vLLM (`/health`, `/metrics`, `/version`, `/tokenize` stay open).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from fp4serve.server.chat import render_chat
from fp4serve.server.chat_serving import full_chat, plan_chat_async, stream_chat
from fp4serve.server.completion_serving import full_completion, plan_completion, stream_completion
from fp4serve.server.errors import APIError, bad_request, error_body, from_validation_error, install_handlers
from fp4serve.server.media import collect_media, multimodal_input
from fp4serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from fp4serve.server.state import ServerState
from fp4serve.server.streaming import ClientDisconnected, SSEResponse, unless_disconnected

M = TypeVar("M", bound=BaseModel)
UNSUPPORTED_MEDIA = "Unsupported Media Type: Only 'application/json' is allowed"


class APIKeyMiddleware:
    """401 for `/v1` requests without `Authorization: Bearer <key>` (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "").encode()
        if not secrets.compare_digest(given, self.expected):
            response = JSONResponse(error_body("Unauthorized", 401, "AuthenticationError"), status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def read_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(UNSUPPORTED_MEDIA, 400, "Bad Request")
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"Invalid JSON body: {exc}", 400, "Bad Request") from exc


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object", 400, "Bad Request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "vllm",
        "root": state.settings.model_root,
        "parent": None,
        "max_model_len": state.max_model_len,
        "permission": [
            {
                "id": f"modelperm-{secrets.token_hex(16)}",
                "object": "model_permission",
                "created": state.created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


async def _respond(request: Request, state: ServerState, run: Any, full: Any, stream: Any, streaming: bool) -> Any:
    try:
        run.ticket = state.admission.admit(len(run.params))
    except APIError:
        state.metrics.rejected += 1
        raise
    if streaming:
        return SSEResponse(stream(state, run), on_close=run.ticket.release)
    try:
        body = await unless_disconnected(request, full(state, run))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        run.ticket.release()
    return JSONResponse(body)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="fp4serve", version=state.settings.version, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = state
    install_handlers(app)
    if state.settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.settings.api_key)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.is_healthy() else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": state.settings.version}

    @app.get("/load")
    async def load() -> dict[str, int]:
        return {"server_load": state.admission.in_flight}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state, name) for name in state.settings.served_model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name not in state.settings.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")
        return model_card(state, name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = validate(ChatCompletionRequest, await read_json(request))
        if state.template is None:
            raise bad_request("this model has no chat template; use /v1/completions")
        run = await plan_chat_async(state, req)
        if request.headers.get("x-request-id"):
            run.request_id = f"chatcmpl-{request.headers['x-request-id']}"
        return await _respond(request, state, run, full_chat, stream_chat, bool(req.stream))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = validate(CompletionRequest, await read_json(request))
        run = plan_completion(state, req)
        if request.headers.get("x-request-id"):
            run.request_id = f"cmpl-{request.headers['x-request-id']}"
        return await _respond(request, state, run, full_completion, stream_completion, bool(req.stream))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        data = await read_json(request)
        if isinstance(data, dict) and "messages" in data:
            chat_req = validate(TokenizeChatRequest, data)
            state.check_model(chat_req.model)
            if state.template is None:
                raise bad_request("this model has no chat template")
            rendered = render_chat(
                state.template,
                chat_req.messages,
                tools=chat_req.tools,
                tool_choice="none",
                add_generation_prompt=chat_req.add_generation_prompt,
                continue_final_message=chat_req.continue_final_message,
                template_kwargs=dict(chat_req.chat_template_kwargs or {}),
            )
            ids = state.tokenizer.encode(rendered.prompt, add_special_tokens=chat_req.add_special_tokens)
            images, videos = collect_media(chat_req.messages)
            if images or videos:
                # as vLLM does: the count is the prompt the engine would see, each placeholder expanded
                mm = await asyncio.to_thread(multimodal_input, state, ids, images, videos)
                ids = list(mm.token_ids)
            want_strs = bool(chat_req.return_token_strs)
        else:
            text_req = validate(TokenizeCompletionRequest, data)
            state.check_model(text_req.model)
            ids = state.tokenizer.encode(text_req.prompt, add_special_tokens=text_req.add_special_tokens)
            want_strs = bool(text_req.return_token_strs)
        strs = [state.tokenizer.id_to_token(i) for i in ids] if want_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        req = validate(DetokenizeRequest, await read_json(request))
        state.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of vocabulary (size {state.vocab_size})", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return app
