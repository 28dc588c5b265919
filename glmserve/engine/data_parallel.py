"""Data parallelism (`--data-parallel-size` / `--dp-size`): N engine replicas behind one API server.

Each replica is a whole `LLMEngine` (its own weights, KV cache and scheduler; itself tensor-parallel when
`--tensor-parallel-size` > 1) in a process of its own, with its share of the CPU threads, so the replicas step truly
in parallel. The server's engine thread runs `DataParallelEngine`, which looks to `AsyncEngineClient` like one
engine: `add_request` checks the request (the same `check_request` as the engines), picks a replica with the
cache-aware router (engine/dp_router.py) and queues the request to it; `step` returns whatever outputs the replicas
have sent since; `abort` goes to the request's replica.

IPC: one torch.multiprocessing queue of commands per replica (add, abort, stop) and one queue of results shared by
all (ready, each step's outputs and stats, a failure). Queues, not torch.distributed: the replicas are independent
engines that step at their own pace, and results arrive from any of them at any time, which collectives (every
member calling the same op, under a timeout) do not express; the project already starts its tensor-parallel ranks
with torch.multiprocessing. The tensor-parallel ranks inside a replica still meet on torch.distributed, in a group
of their own.

Failure: a replica that exits (killed, or its engine raised and it reported so) or stays silent for
`--step-timeout` seconds while it holds requests fails the whole engine: the replicas are stopped, every request in
flight gets an error, /health answers 503 and the server exits non-zero (lifecycle.py), as with one engine. A
replica whose server process is gone exits by itself. On CPU only for now (each replica would need its own GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from glmserve.config import GenerationDefaults, ModelConfig
from glmserve.engine.dp_router import CacheAwareRouter, RouterOptions
from glmserve.engine.engine_client import EngineRequest, add_all_or_none
from glmserve.engine.kv_planning import KVCacheSpec
from glmserve.engine.llm_engine import LLMEngine, check_request
from glmserve.engine.scheduler import SchedulerStats
from glmserve.types import EngineOutput, ParamError, SamplingParams

logger = logging.getLogger(__name__)

POLL_S = 0.01  # how long `step` waits for results before the engine thread looks at its commands again
IDLE_CHECK_S = 0.5  # while idle: how often the front checks the replicas, and a replica checks its parent
STOP_JOIN_S = 5.0  # how long replicas get to stop after "stop" before they are killed


class ReplicaFailedError(RuntimeError):
    """A data-parallel replica died, failed or hung."""


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    max_model_len: int
    model_config: ModelConfig
    generation_defaults: GenerationDefaults
    kv_spec: KVCacheSpec | None
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One replica's latest state, for /metrics."""

    routed: int  # requests sent to it, ever
    scheduler: SchedulerStats
    num_steps: int


def threads_per_replica(data_parallel_size: int) -> int:
    """On CPU the replicas share the machine's threads (a tensor-parallel replica splits its share again)."""
    return max(1, torch.get_num_threads() // data_parallel_size)


def _replica_main(index: int, engine_factory: Callable[[], LLMEngine], threads: int, commands, results) -> None:
    """A replica's process: build the engine, then apply commands and step until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server stops us
    torch.set_num_threads(threads)
    try:
        engine = engine_factory()
        info = ReplicaInfo(engine.max_model_len, engine.model_config, engine.generation_defaults, engine.kv_spec,
                           engine.kv_cache.num_blocks, engine.kv_cache.block_size,
                           engine.kv_cache.enable_prefix_caching)
        results.put(("ready", index, info))
        _serve(index, engine, commands, results)
    except BaseException as e:  # noqa: BLE001 - reported to the server, which fails the whole engine
        logger.exception("data-parallel replica %d failed", index)
        results.put(("failed", index, f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    results.close()
    results.join_thread()  # the last stats must reach the server before the process ends


def _serve(index: int, engine: LLMEngine, commands, results) -> None:
    parent = mp.parent_process()
    grammars = None  # a GrammarReceiver, made for the first constrained request
    num_steps = 0
    interval = engine.keep_alive_interval  # None unless tensor parallel
    last_ping = time.monotonic()
    while True:
        busy = engine.has_unfinished_requests()
        batch = []
        try:
            batch.append(commands.get_nowait() if busy else commands.get(timeout=IDLE_CHECK_S))
            while True:
                batch.append(commands.get_nowait())
        except queue.Empty:
            pass
        if parent is not None and not parent.is_alive():
            logger.warning("data-parallel replica %d: the server is gone; exiting", index)
            break
        if any(command[0] == "stop" for command in batch):
            break
        refused: list[EngineOutput] = []
        for command in batch:
            if command[0] == "add":
                requests = command[1]
                if any(r.params.grammar is not None for r in requests):
                    if grammars is None:
                        from glmserve.engine.grammar import GrammarReceiver  # imports xgrammar: only when needed
                        grammars = GrammarReceiver()
                    requests = [_with_grammar_restored(r, grammars) for r in requests]
                error = add_all_or_none(engine, requests)
                if error is not None:  # checked by the front already; only the scheduler's capacity check is left
                    logger.warning("data-parallel replica %d refused a request: %s", index, error)
                    refused += [EngineOutput(r.request_id, [], True, "abort") for r in command[1]]
            else:
                engine.abort(command[1])
        outputs = refused
        if engine.has_unfinished_requests():
            outputs += engine.step()
            num_steps += 1
            last_ping = time.monotonic()
        elif interval is not None and time.monotonic() - last_ping > interval:
            engine.keep_alive()  # a tensor-parallel replica's ranks must hear from it while idle
            last_ping = time.monotonic()
        if batch or outputs:
            results.put(("step", index, outputs, engine.scheduler.stats(), num_steps))
    engine.close()


def _with_grammar_restored(request: EngineRequest, grammars) -> EngineRequest:
    """The request with its serialized grammar (DataParallelEngine.add_request) compiled again, by a GrammarReceiver."""
    if request.params.grammar is None:
        return request
    params = dataclasses.replace(request.params, grammar=grammars.restore(request.params.grammar))
    return dataclasses.replace(request, params=params)


class DataParallelEngine:
    """What `AsyncEngineClient` needs of an engine (add_request, abort, step, stats, ...) over N replica processes.

    `start` (the client's engine factory) spawns the replicas and returns once all have loaded.
    """

    def __init__(self, engine_factory: Callable[[], LLMEngine], size: int, step_timeout: float = 30.0,
                 router_options: RouterOptions = RouterOptions()):
        self._factory = engine_factory
        self.size = size
        self._step_timeout = step_timeout
        self._router_options = router_options
        self._processes: list = []
        self._commands: list = []
        self._results = None
        self.router: CacheAwareRouter | None = None
        self._owner: dict[str, int] = {}  # live request id -> its replica
        self._grammars = None  # a GrammarSender, made for the first constrained request
        self._sequences: dict[str, list[int]] = {}  # live request id -> its tokens so far (the router records them)
        self._stats = [SchedulerStats(0, 0, 0.0, 0, 0)] * size
        self._steps = [0] * size
        self._last_heard = [0.0] * size
        self.keep_alive_interval = IDLE_CHECK_S
        self.scheduler = self  # AsyncEngineClient reads engine.scheduler.stats()

    # ---- start and stop ---------------------------------------------------------------------------------------

    def start(self) -> DataParallelEngine:
        context = mp.get_context("spawn")
        self._results = context.Queue()
        threads = threads_per_replica(self.size)
        for index in range(self.size):
            commands = context.Queue()
            # Not daemonic: a tensor-parallel replica starts its own ranks. `close` and the failure path stop them.
            process = context.Process(target=_replica_main, name=f"glmserve-dp{index}",
                                      args=(index, self._factory, threads, commands, self._results))
            process.start()
            self._commands.append(commands)
            self._processes.append(process)
        with self._stopping_replicas_on_failure():
            infos = self._wait_ready()
        info = infos[0]
        self.max_model_len = min(i.max_model_len for i in infos)
        self.model_config, self.generation_defaults = info.model_config, info.generation_defaults
        self.kv_spec = info.kv_spec  # one replica's pool (each has its own, alike)
        options = self._router_options
        if not info.enable_prefix_caching:
            options = dataclasses.replace(options, prefix_affinity=False)
        self.router = CacheAwareRouter(self.size, info.block_size, info.num_blocks, options)
        logger.info("data parallel: %d replicas (pids %s), %d threads each", self.size,
                    ", ".join(str(p.pid) for p in self._processes), threads)
        return self

    def _wait_ready(self) -> list[ReplicaInfo]:
        infos: dict[int, ReplicaInfo] = {}
        while len(infos) < self.size:
            for message in self._receive(IDLE_CHECK_S):
                if message[0] == "ready":
                    infos[message[1]] = message[2]
        return [infos[i] for i in range(self.size)]

    def close(self) -> None:
        """Stop the replicas (the engine cannot step afterwards)."""
        for commands in self._commands:
            with contextlib.suppress(Exception):
                commands.put(("stop",))
        deadline = time.monotonic() + STOP_JOIN_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        self._kill_replicas()

    def _kill_replicas(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()  # SIGKILL: it ends a stopped process too
            process.join(STOP_JOIN_S)
        self._processes = []

    @contextlib.contextmanager
    def _stopping_replicas_on_failure(self):
        try:
            yield
        except BaseException:
            self._kill_replicas()  # the others would outlive the server: replicas are not daemonic
            raise

    # ---- the engine interface ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        if request_id in self._owner:
            raise ParamError(f"duplicate request id {request_id!r}")
        replica = self.router.route(prompt_token_ids)
        if params.grammar is not None:  # the replica matches it itself; a compiled grammar travels serialized
            if self._grammars is None:
                from glmserve.engine.grammar import GrammarSender  # imports xgrammar: only when needed
                self._grammars = GrammarSender(self.size)
            params = dataclasses.replace(params, grammar=self._grammars.serialize(params.grammar, replica))
        if self.router.loads[replica] == 1:  # it held nothing: its silence counts from now
            self._last_heard[replica] = time.monotonic()
        self._owner[request_id] = replica
        self._sequences[request_id] = list(prompt_token_ids)
        self._commands[replica].put(("add", [EngineRequest(request_id, prompt_token_ids, params)]))

    def abort(self, request_ids: Iterable[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            replica = self._owner.pop(request_id, None)
            if replica is not None:
                self._sequences.pop(request_id, None)
                self.router.finish(replica)
                by_replica.setdefault(replica, []).append(request_id)
        for replica, ids in by_replica.items():
            self._commands[replica].put(("abort", ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def step(self) -> list[EngineOutput]:
        """The outputs the replicas sent since the last call (waiting up to POLL_S for the first)."""
        with self._stopping_replicas_on_failure():
            outputs = []
            for message in self._receive(POLL_S):
                outputs += self._take_step(message)
            self._check_silence()
            return outputs

    def keep_alive(self) -> None:
        """While idle: take in the replicas' latest stats, and fail if one has died."""
        with self._stopping_replicas_on_failure():
            for message in self._receive(0.0):
                self._take_step(message)

    def stats(self) -> SchedulerStats:
        """All replicas together (the KV-cache usage is their mean)."""
        s = self._stats
        return SchedulerStats(sum(x.num_running for x in s), sum(x.num_waiting for x in s),
                              sum(x.kv_cache_usage for x in s) / len(s), sum(x.prefix_cache_queries for x in s),
                              sum(x.prefix_cache_hits for x in s))

    def replica_stats(self) -> list[ReplicaStats]:
        """Per replica, for /metrics (read from the event loop; each entry is replaced whole, never mutated)."""
        routed = self.router.routed if self.router is not None else [0] * self.size
        return [ReplicaStats(routed[i], self._stats[i], self._steps[i]) for i in range(self.size)]

    # ---- results ----------------------------------------------------------------------------------------------

    def _receive(self, timeout: float) -> list[tuple]:
        """The results queued now, waiting up to `timeout` for the first; raises if a replica has failed."""
        messages = []
        try:
            messages.append(self._results.get(timeout=timeout) if timeout else self._results.get_nowait())
            while True:
                messages.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for message in messages:
            if message[0] == "failed":
                raise ReplicaFailedError(f"data-parallel replica {message[1]} failed: {message[2]}")
        for index, process in enumerate(self._processes):  # a replica that is killed reports nothing
            if process.exitcode is not None:
                raise ReplicaFailedError(f"data-parallel replica {index} (pid {process.pid}) exited with "
                                         f"{process.exitcode}")
        return messages

    def _take_step(self, message: tuple) -> list[EngineOutput]:
        _, index, outputs, stats, num_steps = message
        self._stats[index], self._steps[index] = stats, num_steps
        self._last_heard[index] = time.monotonic()
        live = []
        for output in outputs:
            if self._owner.get(output.request_id) != index:  # aborted meanwhile
                continue
            live.append(output)
            sequence = self._sequences[output.request_id]
            sequence += output.new_token_ids
            if output.finished:
                del self._owner[output.request_id], self._sequences[output.request_id]
                self.router.finish(index, sequence)
        return live

    def _check_silence(self) -> None:
        now = time.monotonic()
        for index, load in enumerate(self.router.loads):
            if load and now - self._last_heard[index] > self._step_timeout:
                raise ReplicaFailedError(f"data-parallel replica {index} holds requests and has sent nothing for "
                                         f"{self._step_timeout:g} s (--step-timeout)")
