"""What the server takes on: the size of a request body, the sequences in the engine (its running batch plus a
bounded waiting queue), and how long a request may run.

A request beyond a limit is answered at once, before it reaches the engine: 413 for a body over
`--max-request-body-mb`, 503 with `Retry-After` when the waiting queue is full (`--max-queued-requests`, SGLang's
flag), 400 for a request that could never fit or asks for more than `--max-output-tokens`, 408 when a request
outlives `--request-timeout`. Without `--max-output-tokens`, a max_tokens beyond the context is not an error: the
output stops at the context end, as it always has (GLM's own API example asks for 4096 tokens on any model).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException

from glmserve.engine.engine_client import AsyncEngineClient
from glmserve.serving.errors import APIError, error_response
from glmserve.types import ParamError

RETRY_AFTER_S = 1  # a full queue drains in about the time a batch takes to finish; clients back off and retry


@dataclass(frozen=True, slots=True)
class ServingLimits:
    max_num_seqs: int = 64  # the engine's running batch (--max-num-seqs)
    max_queued_requests: int = 1024  # sequences that may wait beyond it
    max_request_body_bytes: int = 16 * 2**20
    request_timeout: float | None = None  # seconds from submission to the engine to the last token; None: none
    max_output_tokens: int | None = None  # the largest max_tokens a request may ask for; None: the context

    def check_max_tokens(self, max_tokens: int | None, param: str) -> None:
        if self.max_output_tokens is not None and max_tokens is not None and max_tokens > self.max_output_tokens:
            raise ParamError(f"{param} is {max_tokens}; this server generates at most {self.max_output_tokens} "
                             f"tokens per request (--max-output-tokens)", param)

    def admit(self, client: AsyncEngineClient, num_sequences: int) -> None:
        """Refuse a request whose sequences (n per prompt) would overfill the waiting queue.

        Counted on the event loop from the sequences already handed to the engine, so a burst is refused at once,
        exactly, without waiting for the engine's next step."""
        capacity = self.max_num_seqs + self.max_queued_requests
        if num_sequences > capacity:
            raise ParamError(f"this request needs {num_sequences} sequences (prompts x n), more than the server "
                             f"ever takes at once ({capacity}: --max-num-seqs + --max-queued-requests)", "n")
        if client.num_unfinished + num_sequences > capacity:
            raise APIError(503, f"The server is overloaded: its waiting queue is full ({self.max_queued_requests} "
                                f"sequences beyond a running batch of {self.max_num_seqs}); retry later.",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


class _BodyTooLarge(HTTPException):  # FastAPI passes an HTTPException raised while reading the body through
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server accepts ({limit} bytes; "
                              f"--max-request-body-mb).")


class BodySizeLimit:
    """ASGI middleware: a body over the limit gets 413, from its Content-Length before it is read, or as soon as a
    chunked body passes the limit (the error raised from `receive` is answered by the app's handlers)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # the HTTP parser has checked it is a number
            error = _BodyTooLarge(self.max_bytes)
            return await error_response(error.status_code, error.detail, path=scope["path"])(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
