"""The FastAPI app: OpenAI routes (chat, completions, responses) and Anthropic's /v1/messages under /v1, vLLM's
/tokenize, /detokenize and /version, /health and /metrics.

Two plain ASGI middlewares run before any route (not Starlette's BaseHTTPMiddleware, which would get between a
streaming response and the client's disconnect): the API key, sent as `Authorization: Bearer KEY` or as Anthropic's
`x-api-key: KEY`, for every path under /v1, unknown ones included, as vLLM checks it, and for /tokenize and
/detokenize unless --tokenize-without-api-key; and the request body limit.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from glmserve.engine.engine_client import failure_message
from glmserve.serving.anthropic import count_tokens, create_message
from glmserve.serving.anthropic_protocol import CountTokensRequest, MessagesRequest
from glmserve.serving.chat import create_chat_completion, render_prompt
from glmserve.serving.completions import create_completion
from glmserve.serving.errors import error_response, install_error_handlers
from glmserve.serving.limits import BodySizeLimit
from glmserve.serving.lora_routes import lora_router, runtime_updates_allowed
from glmserve.serving.prompt_workers import check_fits
from glmserve.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from glmserve.serving.responses import create_response
from glmserve.serving.responses_protocol import ResponsesRequest
from glmserve.serving.state import ServerState
from glmserve.types import ParamError

try:
    _VERSION = importlib.metadata.version("glmserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = "unknown"


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.client.start()
        yield
        state.client.shutdown()

    app = FastAPI(title="glmserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=state.limits.max_request_body_bytes)
    app.add_middleware(_APIKeyCheck, state=state)  # added last: runs first

    v1 = APIRouter(prefix="/v1")

    def card(name: str) -> ModelCard:
        max_len = state.client.require_info().max_model_len
        lora = state.client.loras.get(name) if name not in state.model_names else None
        if lora is not None:  # an adapter: its base model is the parent, as in vLLM
            return ModelCard(id=name, root=lora.lora_path, parent=state.model_names[0], max_model_len=max_len)
        return ModelCard(id=name, root=state.model_path, max_model_len=max_len)

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in [*state.model_names, *state.client.loras]])

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        return card(state.model_name(model_id))  # an unknown name is 404, as in vLLM

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    @v1.post("/messages")
    async def messages(req: MessagesRequest, raw: Request):
        return await create_message(state, req, raw)

    @v1.post("/messages/count_tokens")
    async def messages_count_tokens(req: CountTokensRequest):
        return await count_tokens(state, req)

    @v1.post("/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        return await create_response(state, req, raw)

    app.include_router(v1)
    if runtime_updates_allowed():
        app.include_router(lora_router(state))

    @app.get("/health")
    async def health() -> Response:
        if state.client.error is not None:
            return error_response(503, failure_message(state.client.error))
        if not state.client.ready:
            return error_response(503, "the model is still loading")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _VERSION})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def tokenize_in_worker(req: TokenizeRequest, max_model_len: int) -> list[int]:
        if req.messages is not None:
            tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools else None
            text = render_prompt(state, req.messages, tools, req.add_generation_prompt, req.chat_template_kwargs or {})
            check_fits(text, state.tokenizer, max_model_len, "messages")
            return state.tokenizer.encode_marked(text, add_special_tokens=req.add_special_tokens)
        check_fits(req.prompt, state.tokenizer, max_model_len, "prompt")
        return state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        state.model_name(req.model)
        info = state.client.require_info()
        tokens = await state.prompt_workers.run(tokenize_in_worker, req, info.max_model_len)
        strs = [state.tokenizer.id_to_token(t) for t in tokens] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens,
                             "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        state.model_name(req.model)
        vocab = state.client.require_info().vocab_size
        if any(t >= vocab for t in req.tokens):
            raise ParamError(f"token ids must be in [0, {vocab})", "tokens")
        text = await state.prompt_workers.run(state.tokenizer.decode, req.tokens, False)
        return JSONResponse({"prompt": text})

    return app


class _APIKeyCheck:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    def _guarded(self, path: str) -> bool:
        # /tokenize and /detokenize cost CPU per request like the /v1 routes do (unlike vLLM, they need the key).
        tokenizer = path in ("/tokenize", "/detokenize") and not self.state.tokenize_without_api_key
        return tokenizer or path == "/v1" or path.startswith("/v1/")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._guarded(scope["path"]):
            headers = dict(scope["headers"])
            sent = [headers.get(b"authorization", b"").decode("latin-1")]
            if b"x-api-key" in headers:  # Anthropic's clients send the key this way
                sent.append("Bearer " + headers[b"x-api-key"].decode("latin-1"))
            if not any(self.state.authorized(authorization) for authorization in sent):
                response = error_response(401, "Incorrect or missing API key: send it as `Authorization: Bearer "
                                               "<key>` or `x-api-key: <key>`.", code="invalid_api_key",
                                          path=scope["path"])
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
