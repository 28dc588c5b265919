"""The FastAPI app: OpenAI routes under /v1 (behind the API key when one is set), vLLM's /tokenize and
/detokenize, /health and /metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from glmserve.serving.chat import create_chat_completion, render_prompt
from glmserve.serving.completions import create_completion
from glmserve.serving.errors import APIError, error_response, install_error_handlers
from glmserve.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from glmserve.serving.state import ServerState
from glmserve.types import ParamError


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.client.start()
        yield
        state.client.shutdown()

    app = FastAPI(title="glmserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        if not state.authorized(request.headers.get("authorization")):
            raise APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def models() -> ModelList:
        info = state.client.require_info()
        cards = [ModelCard(id=name, root=state.model_path, max_model_len=info.max_model_len)
                 for name in state.model_names]
        return ModelList(data=cards)

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if state.client.error is not None:
            return error_response(503, f"the engine has failed: {state.client.error!r}")
        if not state.client.ready:
            return error_response(503, "the model is still loading")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        state.model_name(req.model)
        info = state.client.require_info()
        if req.messages is not None:
            tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools else None
            text = render_prompt(state, req.messages, tools, req.add_generation_prompt, req.chat_template_kwargs or {})
        else:
            text = req.prompt
        tokens = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        strs = [state.tokenizer.id_to_token(t) for t in tokens] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens,
                             "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        state.model_name(req.model)
        vocab = state.client.require_info().vocab_size
        if any(t >= vocab for t in req.tokens):
            raise ParamError(f"token ids must be in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    return app
