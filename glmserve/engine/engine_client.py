"""AsyncEngineClient: the serving layer's only way to the engine (DESIGN.md).

The engine is built and stepped in one dedicated thread, which alone touches it. The asyncio side talks to that
thread through a command queue (adds, aborts), applied between steps; results come back once per step with
`loop.call_soon_threadsafe`, into the `RequestStream` of each request. When there is nothing to do, the thread
sleeps on a condition variable. If the engine raises, the client is dead: every stream fails with
`EngineDeadError` and so does every later add. Keeping the engine behind this class lets it move to its own
process later without the serving code changing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmserve.config import GenerationDefaults
from glmserve.engine.kv_planning import KVCacheSpec
from glmserve.engine.scheduler import SchedulerStats
from glmserve.engine.stat_logger import StatLogger
from glmserve.loader.heap import one_heap_for_every_thread
from glmserve.types import EngineOutput, LoRARequest, ParamError, SamplingParams

if TYPE_CHECKING:  # the client itself needs no torch; only the factory it is given builds an engine
    from glmserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed (while loading or stepping); nothing more can be served."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading."""


def failure_message(error: BaseException) -> str:
    """What a client is told of an engine failure: its kind only. The message itself can hold internals (a gloo
    source path, the ranks' rendezvous address); the log has it whole."""
    return f"the engine has failed ({type(error).__name__}); the server's log has the details"


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What serving needs to know about the loaded engine; plain values, read once when it is ready."""

    max_model_len: int
    vocab_size: int
    generation_defaults: GenerationDefaults
    kv_cache: KVCacheSpec | None = None  # the pool's dtype, blocks and tokens
    lora_requests: tuple[LoRARequest, ...] = ()  # adapters loaded at start-up


def add_all_or_none(engine: LLMEngine, requests: list[EngineRequest]) -> ParamError | None:
    """Add the requests of one group, or none: a refused request takes its siblings back out. The refusal, if any."""
    added = []
    try:
        for r in requests:
            engine.add_request(r.request_id, r.prompt_token_ids, r.params)
            added.append(r.request_id)
    except ValueError as e:  # ParamError, or the scheduler refusing a request that cannot fit
        engine.abort(added)
        return e if isinstance(e, ParamError) else ParamError(str(e))
    return None


def _merge(a: EngineOutput, b: EngineOutput) -> EngineOutput:
    logprobs = None if a.new_logprobs is None and b.new_logprobs is None else (a.new_logprobs or []) + (
        b.new_logprobs or [])
    return dataclasses.replace(b, new_token_ids=a.new_token_ids + b.new_token_ids, new_logprobs=logprobs)


class RequestStream:
    """Async iterator over the outputs of one or more engine requests (the n choices of one API request).

    Outputs of a request that queued up while the consumer was busy come out merged into one. Iteration ends when
    every request has finished or been aborted through `abort`.
    """

    def __init__(self, client: AsyncEngineClient, request_ids: Iterable[str]):
        self._client = client
        self._live = set(request_ids)
        self._pending: deque[EngineOutput] = deque()
        self._event = asyncio.Event()
        self._error: BaseException | None = None

    def _push(self, output: EngineOutput) -> None:
        if output.request_id not in self._live:
            return
        self._pending.append(output)
        if output.finished:
            self._live.discard(output.request_id)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        """End the stream with `error`, raised to its reader once the outputs already queued are read."""
        self._error = error
        self._event.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineOutput:
        while not self._pending:
            if self._error is not None:
                raise self._error
            if not self._live:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        output = self._pending.popleft()
        for later in [o for o in self._pending if o.request_id == output.request_id]:
            self._pending.remove(later)
            output = _merge(output, later)
        return output

    def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort the named live requests (all when None); their KV blocks are freed before the next step."""
        ids = set(self._live if request_ids is None else request_ids) & self._live
        if not ids:
            return
        self._live -= ids
        self._pending = deque(o for o in self._pending if o.request_id not in ids)
        self._client.abort(ids)
        self._event.set()


class AsyncEngineClient:
    def __init__(self, engine_factory: Callable[[], LLMEngine]):
        self._factory = engine_factory
        self._cond = threading.Condition()
        # ("add", requests, future) | ("abort", ids) | ("call", fn, future); guarded by _cond
        self._commands: deque[tuple] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self.info: EngineInfo | None = None
        self.loras: dict[str, LoRARequest] = {}  # the engine's LoRA adapters by name (event-loop side)
        self.error: BaseException | None = None
        self.stats = SchedulerStats(0, 0, 0.0, 0, 0)  # replaced (never mutated) by the engine thread
        self.num_steps = 0  # engine steps run; only the engine thread writes it
        self._dead: asyncio.Event | None = None
        self._stat_logger = StatLogger()

    # ---- the hand-off between the two threads ------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _take_commands(self) -> list[tuple]:
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _call(self, callback: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop has closed: the server is shutting down, nobody is waiting
            pass

    # ---- event-loop side ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start building the engine in its thread; idempotent. Call from the event loop that will use it."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._dead = asyncio.Event()
        one_heap_for_every_thread()  # the engine thread's step temporaries under the steps' heap policy
        self._thread = threading.Thread(target=self._run, name="glmserve-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> EngineInfo:
        """The engine's info once it has loaded; raises EngineDeadError if loading failed."""
        return await asyncio.shield(self._ready)

    async def wait_dead(self) -> BaseException:
        """Wait until the engine has failed (while loading or stepping); returns its error."""
        await self._dead.wait()
        return self.error

    @property
    def num_unfinished(self) -> int:
        """Engine requests handed over and not yet finished or aborted (event-loop side)."""
        return len(self._streams)

    @property
    def ready(self) -> bool:
        return self.info is not None and self.error is None

    def require_info(self) -> EngineInfo:
        """The engine's info; raises EngineNotReadyError while loading, EngineDeadError once it has failed."""
        if self.error is not None:
            raise EngineDeadError(failure_message(self.error))
        if self.info is None:
            raise EngineNotReadyError("the model is still loading")
        return self.info

    async def add_requests(self, requests: Sequence[EngineRequest]) -> RequestStream:
        """Queue requests as one group and wait until the engine has accepted them (or refused them all, with a
        ParamError). Returns one stream over all of them."""
        self.require_info()
        ids = [r.request_id for r in requests]
        stream = RequestStream(self, ids)
        accepted = self._loop.create_future()
        for request_id in ids:
            self._streams[request_id] = stream
        self._send(("add", list(requests), accepted))
        try:
            await accepted
        except BaseException:
            # Refused, or the caller went away while waiting: either way nobody will read these requests.
            stream.abort()
            raise
        return stream

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        return await self.add_requests([EngineRequest(request_id, prompt_token_ids, params)])

    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run fn(engine) in the engine thread between two steps (LoRA loads and unloads); its result comes back,
        or its exception is raised here."""
        self.require_info()
        done = self._loop.create_future()
        self._send(("call", fn, done))
        return await done

    def abort(self, request_ids: Iterable[str]) -> None:
        """Abort requests, from any thread: queued, and applied between two engine steps. Unknown or finished
        ids are ignored. (Their stream, if any, must stop reading them: `RequestStream.abort` does.)"""
        ids = list(request_ids)
        self._send(("abort", ids))
        self._call(self._forget, ids)

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine thread to end after `shutdown` (it finishes its step first): a process that exits
        while the thread is inside a torch op is aborted by the C++ runtime. Whether it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream._push(output)

    def _on_ready(self, info: EngineInfo) -> None:
        self.info = info
        self.loras = {lora.lora_name: lora for lora in info.lora_requests}
        self._ready.set_result(info)

    def _on_dead(self, error: BaseException) -> None:
        self.error = error
        self._dead.set()
        dead = EngineDeadError(failure_message(error))
        if not self._ready.done():
            self._ready.set_exception(dead)
        for stream in set(self._streams.values()):
            stream.fail(dead)
        self._streams.clear()
        # The engine thread has stopped taking commands: answer the adds still queued.
        for command in self._take_commands():
            if command[0] in ("add", "call"):
                self._settle(command[2], dead)

    @staticmethod
    def _settle(future: asyncio.Future, error: BaseException | None, result: object = None) -> None:
        if future.done():  # the waiting caller was cancelled; add_requests has aborted its requests
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    # ---- engine thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._factory()
            loras = getattr(engine, "loras", None)  # (test fakes of the engine have none)
            info = EngineInfo(engine.max_model_len, engine.model_config.vocab_size, engine.generation_defaults,
                              engine.kv_spec, tuple(loras.adapters.values()) if loras is not None else ())
            self.stats = engine.scheduler.stats()
            self._call(self._on_ready, info)
            while self._serve_once(engine):
                pass
            engine.close()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine; report it, don't lose it
            if self._stopping:  # the server ended a hung step while stopping (it kills tensor-parallel ranks)
                logger.warning("the engine stopped in the middle of a step: %r", e)
            else:
                logger.exception("engine failed")
            self._call(self._on_dead, e)

    def _serve_once(self, engine: LLMEngine) -> bool:
        # A tensor-parallel engine is pinged while idle (engines without ranks, fakes included, never are).
        interval = getattr(engine, "keep_alive_interval", None)
        with self._cond:
            while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                if not self._cond.wait(interval):
                    break
            if self._stopping:
                return False
            idle = not (self._commands or engine.has_unfinished_requests())
        if idle:  # waited an interval with nothing to do
            engine.keep_alive()
            return True
        for command in self._take_commands():
            if command[0] == "add":
                self._call(self._settle, command[2], add_all_or_none(engine, command[1]))
            elif command[0] == "call":
                self._call(self._settle, command[2], *self._apply(engine, command[1]))
            else:
                engine.abort(command[1])
        outputs = []
        if engine.has_unfinished_requests():
            outputs = engine.step()
            self.num_steps += 1
        self.stats = engine.scheduler.stats()  # before the outputs: whoever sees a request end sees its blocks freed
        self._stat_logger.record(self.stats, sum(len(o.new_token_ids) for o in outputs))
        if outputs:
            self._call(self._dispatch, outputs)
        return True

    @staticmethod
    def _apply(engine: LLMEngine, fn: Callable) -> tuple[BaseException | None, object]:
        try:
            return None, fn(engine)
        except ValueError as e:  # a refused call (a bad adapter, one in use); anything else kills the engine
            return e, None
