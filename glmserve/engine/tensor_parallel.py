"""Tensor parallelism inside one engine: the engine's process is rank 0 and starts ranks 1..N-1 itself.

Each rank holds its shard of the weights in its own ModelRunner (one GPU each on CUDA; on CPU the cores are split
between the processes). Every step rank 0 broadcasts the SchedulerOutput through the TP process group (the same
torch.distributed group the model's all-reduces use) and every rank runs the same `execute`: the same forward,
whose all-reduces meet; the same sampling, from identical logits and identically seeded generators; the same MTP
drafts. Rank 0's result is the step's; the others' are dropped. The scheduler and the KV block table live on rank
0 only and travel inside the step. (vLLM's multiprocess executor is built the same way.)

A rank that dies makes rank 0's next collective fail at once; one that hangs (stopped, or stuck) makes it fail at
`--step-timeout`, the collectives' timeout once the model is loaded. While the engine is idle, rank 0 sends a
round trip every third of that (`keep_alive`), so that the other ranks' wait for the next step never times out
and a hung rank is found idle too. After any failure rank 0 kills the other ranks: the group is broken, and a
stopped process would otherwise outlive the server.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import torch
import torch.multiprocessing as mp

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner, resolve_device
from glmserve.types import SchedulerOutput, StepOutput

logger = logging.getLogger(__name__)

# Unseeded sampling draws from torch's global generator: every rank seeds it alike so that all draw the same.
GLOBAL_SEED = 0
STOP_JOIN_S = 5.0  # how long the other ranks get to leave the group after "stop" before they are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(config: EngineConfig) -> int | None:
    """On CPU the ranks share the machine's cores (torch's default is all of them in every process)."""
    if resolve_device(config.device).type == "cuda":
        return None
    return max(1, torch.get_num_threads() // config.tensor_parallel_size)


def _worker(rank: int, model_config: ModelConfig, config: EngineConfig, init_method: str,
            threads: int | None) -> None:
    """Ranks 1..N-1: build the shard, then run every step rank 0 broadcasts until it says stop."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(GLOBAL_SEED)
    runner = ModelRunner(model_config, config, progress=False, rank=rank, init_method=init_method)
    runner.parallel.set_timeout(config.step_timeout)
    while True:
        command, payload = runner.parallel.broadcast()
        if command == "execute":
            runner.execute(payload)
        elif command == "release":
            runner.release(payload)
        elif command == "ping":
            runner.parallel.round_trip(runner.device)
        else:  # "stop"
            break
    torch.distributed.destroy_process_group()


class TensorParallelRunner:
    """ModelRunner's interface (execute, release, num_blocks, model) over N processes."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, progress: bool = True):
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = _threads_per_rank(config)
        context = mp.get_context("spawn")
        self.workers = [context.Process(target=_worker, args=(rank, model_config, config, init_method, threads),
                                        daemon=True, name=f"glmserve-tp{rank}")
                        for rank in range(1, config.tensor_parallel_size)]
        for worker in self.workers:
            worker.start()
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(GLOBAL_SEED)
        self.runner = ModelRunner(model_config, config, progress=progress, rank=0, init_method=init_method)
        self.runner.parallel.set_timeout(config.step_timeout)
        self.keep_alive_interval = config.step_timeout / 3
        self.model = self.runner.model
        self.num_blocks = self.runner.num_blocks
        self.kv_spec = self.runner.kv_spec
        logger.info("tensor parallel: %d processes (ranks 1-%d: pids %s)", config.tensor_parallel_size,
                    config.tensor_parallel_size - 1, ", ".join(str(w.pid) for w in self.workers))

    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        with self._killing_workers_on_failure():
            self.runner.parallel.broadcast(("execute", scheduler_output))
            return self.runner.execute(scheduler_output)

    def release(self, request_id: str) -> None:
        with self._killing_workers_on_failure():
            self.runner.parallel.broadcast(("release", request_id))
            self.runner.release(request_id)

    def keep_alive(self) -> None:
        """A round trip through every rank, for an idle engine every `keep_alive_interval` seconds."""
        with self._killing_workers_on_failure():
            self.runner.parallel.broadcast(("ping", None))
            self.runner.parallel.round_trip(self.runner.device)

    @contextlib.contextmanager
    def _killing_workers_on_failure(self):
        try:
            yield
        except BaseException:
            self._kill_workers()
            with contextlib.suppress(Exception):  # the group is broken; leave it so a new engine can make one
                torch.distributed.destroy_process_group()
            raise

    def _kill_workers(self) -> None:
        for worker in self.workers:
            worker.kill()  # SIGKILL: it ends a stopped process too
            worker.join(timeout=STOP_JOIN_S)
        self.workers = []

    def close(self) -> None:
        """Stop the other ranks and leave the group (the engine cannot step afterwards)."""
        if not self.workers:
            return
        with self._killing_workers_on_failure():
            self.runner.parallel.broadcast(("stop", None))  # a stopped rank's socket buffers it
        for worker in self.workers:
            worker.join(timeout=STOP_JOIN_S)
        self._kill_workers()  # any that did not leave (a hung rank)
        torch.distributed.destroy_process_group()
