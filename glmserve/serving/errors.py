"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every way a request can fail;
under /v1/messages (Anthropic's API) in Anthropic's, `{"type": "error", "error": {"type", "message"}}`, same status.

Bad input is always a 4xx: pydantic validation (malformed JSON included: 400, not FastAPI's 422), `ParamError`
from any layer, a chat template that cannot render the messages. A 503 means the server cannot take the request
now (loading, overloaded, the engine has failed); a 500 means a bug in glmserve. A bug is logged with its
traceback but not its message, which may quote the request: logs carry no prompt unless --enable-log-requests.
"""

from __future__ import annotations

import json
import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from glmserve.engine.engine_client import EngineDeadError, EngineNotReadyError
from glmserve.serving.chat_template import ChatTemplateError
from glmserve.types import ParamError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   path: str = "") -> JSONResponse:
    """The error in the shape of the API that `path` belongs to."""
    body = anthropic_error_body(status, message) if is_anthropic_path(path) else error_body(status, message, param,
                                                                                             code)
    return JSONResponse(body, status_code=status)


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types by status (its API answers 504 timeout_error where glmserve answers 408).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def sse_error(error: Exception) -> str:
    """An error that happens after a stream has started: one `data:` event in the same shape."""
    status, message, param, code = describe(error)
    return f"data: {json.dumps(error_body(status, message, param, code), ensure_ascii=False)}\n\n"


def describe(error: Exception) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error.status, error.message, error.param, error.code
    if isinstance(error, ParamError):
        return 400, str(error), error.param, None
    if isinstance(error, ChatTemplateError):
        return 400, str(error), "messages", None
    if isinstance(error, EngineNotReadyError):
        return 503, str(error), None, None
    if isinstance(error, EngineDeadError):
        return 503, str(error), None, None
    frames = "".join(traceback.format_tb(error.__traceback__))
    logger.error("internal error: %s (message withheld: it may quote the request)\n%s", type(error).__name__, frames)
    return 500, f"internal error: {type(error).__name__}", None, None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    messages, param = [], None
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if err.get("type") == "json_invalid":
            messages.append(f"Invalid JSON body: {cause or err.get('msg')}")
            continue
        if isinstance(cause, ParamError):
            messages.append(str(cause))
            param = param or cause.param
            continue
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        # A field inside a union reports each branch under the branch's type name; those names only confuse.
        path = ".".join(p for p in loc if not (p[:1].isupper() or "[" in p or p in _TYPE_TAGS)) or "body"
        messages.append(f"{path}: {err.get('msg')}")
        param = param or (loc[0] if loc else None)
    return "; ".join(dict.fromkeys(messages)), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param, path=request.url.path)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), path=request.url.path)

    async def _known(request: Request, exc: Exception):
        response = error_response(*describe(exc), path=request.url.path)
        if isinstance(exc, APIError) and exc.headers:
            response.headers.update(exc.headers)
        return response

    # Specific classes are answered by the exception middleware; `Exception` (a bug) by the outermost one.
    for cls in (APIError, ParamError, ChatTemplateError, EngineNotReadyError, EngineDeadError, Exception):
        app.add_exception_handler(cls, _known)
