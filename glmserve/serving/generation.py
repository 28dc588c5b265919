"""One API request's trip through the engine, shared by every API.

`Generation` submits one engine request per choice (n per prompt), turns their token deltas into text deltas
through the shared output path (glmserve.serving.output_processor: detokenization, stop strings, which abort the
engine request, usage), and records the request's metrics when it is closed. `close()` also aborts whatever is
still running, so every exit path (done, error, client gone, deadline passed) frees the KV blocks; it is
idempotent. Before submitting, it asks the server's limits to admit
the request's sequences (503 when the queue is full) and logs the prompt only with --enable-log-requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from glmserve.engine.engine_client import EngineInfo, EngineRequest, RequestStream
from glmserve.serving.drain import InFlight
from glmserve.serving.errors import APIError, sse_error
from glmserve.serving.metrics import RequestTimer
from glmserve.serving.output_processor import ChoiceDelta, OutputProcessor, default_sampling
from glmserve.serving.protocol import SamplingFields, UsageInfo, random_id
from glmserve.serving.state import ServerState
from glmserve.types import LoRARequest, SamplingParams

logger = logging.getLogger(__name__)


def sampling_params(req: SamplingFields, info: EngineInfo, *, max_tokens: int | None, logprobs: int | None,
                    skip_special_tokens: bool, lora_request: LoRARequest | None = None) -> SamplingParams:
    """The request's sampling fields, with the checkpoint's generation_config defaults where the request has none
    (as vLLM applies them), and the LoRA adapter it runs with. Raises ParamError."""
    return SamplingParams(
        n=req.n, **default_sampling(info.generation_defaults, req.temperature, req.top_p, req.top_k),
        min_p=req.min_p if req.min_p is not None else 0.0, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
        skip_special_tokens=skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
        lora_request=lora_request,
    )


class Generation:
    def __init__(self, outputs: OutputProcessor, stream: RequestStream, timer: RequestTimer, timeout: float | None,
                 in_flight: InFlight | None = None):
        self.outputs = outputs
        self.params = outputs.params
        self.choices = outputs.choices
        self._stream = stream
        self._timer = timer
        self._timeout = timeout
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._closed = False
        self._in_flight = in_flight
        if in_flight is not None:
            in_flight.add(self)

    @classmethod
    async def start(cls, state: ServerState, prompts: list[list[int]], params: SamplingParams,
                    api: str) -> Generation:
        """Submit n choices per prompt (choice index = prompt index * n + sample index); `api` labels the request
        in /metrics. Raises ParamError, or APIError 503 when the waiting queue is full."""
        timer = RequestTimer(state.metrics)
        state.limits.admit(state.client, len(prompts) * params.n)
        state.metrics.requests.labels(api).inc()
        base = random_id("req")
        if state.log_requests:
            _log_request(state, base, prompts, params)
        outputs = OutputProcessor(state.tokenizer, prompts, params, base)
        stream = await state.client.add_requests([EngineRequest(c.request_id, c.prompt_token_ids, p)
                                                  for c, p in zip(outputs.choices, outputs.sample_params)])
        try:
            return cls(outputs, stream, timer, state.limits.request_timeout, state.in_flight)
        except BaseException:  # the server's grace period is over: nobody will read these requests
            stream.abort()
            raise

    async def _outputs(self):
        """The engine's outputs, ending with APIError 408 at the deadline (the caller's close() aborts the rest)."""
        while True:
            try:
                async with asyncio.timeout_at(self._deadline):
                    out = await anext(self._stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise APIError(408, f"The request did not finish within the server's deadline of {self._timeout:g} s "
                                    f"(--request-timeout).", code="request_timeout") from None
            yield out

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        async for out in self._outputs():
            delta = self.outputs.process(out)
            if delta is None:
                continue
            self._timer.tokens_arrived()
            if delta.abort:
                self._stream.abort([out.request_id])
            yield delta

    def usage(self) -> UsageInfo:
        return self.outputs.usage()

    def fail(self, error: Exception) -> None:
        """End the output with `error` (raised to whoever reads `deltas`), e.g. when the server stops."""
        self._stream.fail(error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._in_flight is not None:
            self._in_flight.discard(self)
        self._stream.abort()
        self._timer.finish(self.usage().prompt_tokens, [c.num_output_tokens for c in self.choices],
                           [c.finish_reason for c in self.choices])


def _log_request(state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams) -> None:
    # vLLM's "Received request" line: the prompt as text and ids, cut to --max-log-len.
    cut = slice(state.max_log_len)
    for i, ids in enumerate(prompts):
        text = state.tokenizer.decode(ids[cut], skip_special_tokens=False)[cut]
        logger.info("Received request %s (prompt %d): prompt: %r, prompt_token_ids: %s, params: %s", request_id, i,
                    text, ids[cut], params)


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it if the client disconnects first (its cleanup then aborts the engine requests).

    Streaming responses need no such watch: Starlette cancels their body iterator when the client goes away.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:  # the client left (or the server is stopping): the work's own cleanup aborts its requests
            task.cancel()
    if gone:
        return Response(status_code=499)  # nobody will read it; nginx's code for "client closed the request"
    return task.result()


# JSON leaves these unescaped, and SSE ends lines only at CR and LF, but Python's str.splitlines (and so httpx's
# iter_lines) also splits at them: a model that writes one would cut such a client's event in two.
_LINE_BREAKS_OUTSIDE_SSE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def stream_response(gen: Generation, chunks: AsyncIterator[str], usage_chunk: Callable[[], str] | None,
                    *, done: str = "data: [DONE]\n\n",
                    error_event: Callable[[Exception], str] = sse_error) -> StreamingResponse:
    """The SSE framing every API shares: its chunks, then the usage chunk when asked for, then `done` (OpenAI's
    `[DONE]`, after an error event too, as vLLM ends its streams; Anthropic's and the Responses API's streams end
    with their own last event instead). An error after the status line can only go into the stream, as
    `error_event`; the generation is closed on every exit, a client that went away included. Unicode line
    separators in a chunk's JSON are escaped."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk.translate(_LINE_BREAKS_OUTSIDE_SSE)
            if usage_chunk is not None:
                yield usage_chunk()
        except Exception as e:  # noqa: BLE001 - the status line is sent; the error can only go in the stream
            yield error_event(e).translate(_LINE_BREAKS_OUTSIDE_SSE)
        finally:
            gen.close()
        if done:
            yield done

    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(gen.close))
