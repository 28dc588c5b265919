"""Tensor and pipeline parallelism, on one node or several: the engine's process is rank 0 of a world of tp x pp.

Each rank holds its shard of its pipeline stage's layers in its own ModelRunner (one GPU each on CUDA; on CPU a
node's cores are split between its processes). Every step rank 0 broadcasts the SchedulerOutput to the whole
world and every rank runs the same `execute`: a stage's tensor-parallel ranks the same forward, whose all-reduces
meet; the stages one after another, micro-batch by micro-batch (engine/pipeline.py); the last stage's ranks the
same sampling, from identical logits and identically seeded generators, and the same MTP drafts. Rank 0's result
is the step's (with several stages the last stage's first rank sends it to rank 0); the others' are dropped. The
scheduler and the KV block table live on rank 0 only and travel inside the step. (vLLM's multiprocess executor
is built the same way.)

Nodes (SGLang's --nnodes/--node-rank/--dist-init-addr): node r hosts ranks r*L .. r*L+L-1 (L = tp x pp / nnodes,
so a stage's tensor-parallel ranks share a node when L is a multiple of tp). Each node's first process meets the
others at the rendezvous (distributed/rendezvous.py), then starts its node's other ranks itself. Node 0 runs the
server and the scheduler; the other nodes (`run_worker_node`, vLLM's --headless) run steps until node 0 stops
them or the world breaks. Under torchrun every process is started for us and finds its rank in the environment.

A rank that dies makes rank 0's next collective fail at once; one that hangs (stopped, or stuck) makes it fail at
`--step-timeout`, the collectives' timeout once the model is loaded. While the engine is idle, rank 0 sends a
round trip every third of that (`keep_alive`), so that the other ranks' wait for the next step never times out
and a hung rank is found idle too. After any failure rank 0 kills the ranks it started: the world is broken, and a
stopped process would otherwise outlive the server; the other nodes' ranks fail at their next collective and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket

import torch
import torch.multiprocessing as mp

from glmserve.config import EngineConfig, ModelConfig
from glmserve.distributed.rendezvous import agree_on_nodes, open_store
from glmserve.engine.model_runner import ModelRunner, resolve_device
from glmserve.types import SchedulerOutput, StepOutput

logger = logging.getLogger(__name__)

# Unseeded sampling draws from torch's global generator: every rank seeds it alike so that all draw the same.
GLOBAL_SEED = 0
STOP_JOIN_S = 5.0  # how long the other ranks get to leave the group after "stop" before they are killed
# What every node must be launched with alike (the rest, e.g. the model's path, may differ between machines).
AGREED_SETTINGS = ("nnodes", "tensor_parallel_size", "pipeline_parallel_size", "enable_expert_parallel",
                   "num_speculative_tokens", "dtype", "weight_dtype", "quantization", "load_format", "block_size",
                   "kv_cache_dtype", "seed", "step_timeout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or a launcher like it) started it, else None."""
    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["RANK"])
    return None


def _threads_per_rank(config: EngineConfig) -> int | None:
    """On CPU a node's ranks share its cores (torch's default is all of them in every process)."""
    if resolve_device(config.device).type == "cuda":
        return None
    return max(1, torch.get_num_threads() // config.ranks_per_node)


def _join_world(config: EngineConfig, node_rank: int) -> tuple[torch.distributed.Store, EngineConfig]:
    """This node's first process at the rendezvous: the store, and the config with the address it is at."""
    if config.dist_init_addr is None:  # one node: rank 0 picks a free local port
        config = dataclasses.replace(config, dist_init_addr=f"127.0.0.1:{_free_port()}")
    address = config.dist_init_addr
    store = open_store(address, is_master=node_rank == 0, timeout=config.dist_timeout)
    if config.nnodes > 1:
        agree_on_nodes(store, node_rank, config.nnodes, {k: getattr(config, k) for k in AGREED_SETTINGS},
                       config.dist_timeout)
    return store, config


def _start_ranks(ranks: range, model_config: ModelConfig, config: EngineConfig) -> list:
    threads = _threads_per_rank(config)
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker, args=(rank, model_config, config, threads), daemon=True,
                               name=f"glmserve-rank{rank}") for rank in ranks]
    for worker in workers:
        worker.start()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(GLOBAL_SEED)
    return workers


def _worker(rank: int, model_config: ModelConfig, config: EngineConfig, threads: int | None) -> None:
    """A rank a node's first process started: meet the world at the node's address, then run steps."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(GLOBAL_SEED)
    store = open_store(config.dist_init_addr, is_master=False, timeout=config.dist_timeout)
    _run_steps(ModelRunner(model_config, config, progress=False, rank=rank, store=store), config)


def _run_steps(runner: ModelRunner, config: EngineConfig) -> None:
    """Run every step rank 0 broadcasts until it says stop (an exception: the world broke)."""
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
    runner.parallel.leave()


def _describe(workers: list, rank: int) -> str:
    """The ranks a node's first process (rank) started, with their pids, for the log."""
    if not workers:
        return "none"
    return f"(ranks {rank + 1}-{rank + len(workers)}: pids {', '.join(str(w.pid) for w in workers)})"


def _kill(workers: list) -> None:
    for worker in workers:
        worker.kill()  # SIGKILL: it ends a stopped process too
        worker.join(timeout=STOP_JOIN_S)


def run_worker_node(model_config: ModelConfig, config: EngineConfig) -> int:
    """A node other than node 0 (vLLM's --headless; or a torchrun rank other than 0): its ranks run the steps
    node 0 broadcasts. Returns the exit status: 0 when node 0 stopped the world, 1 when it broke."""
    rank, store, workers = torchrun_rank(), None, []
    torch.manual_seed(GLOBAL_SEED)
    try:
        if rank is None:
            store, config = _join_world(config, config.node_rank)
            rank = config.node_rank * config.ranks_per_node
            workers = _start_ranks(range(rank + 1, rank + config.ranks_per_node), model_config, config)
        logger.info("node %d: rank %d of %d, running node 0's steps; this node's others: %s", config.node_rank, rank,
                    config.tensor_parallel_size * config.pipeline_parallel_size, _describe(workers, rank))
        _run_steps(ModelRunner(model_config, config, progress=False, rank=rank, store=store), config)
    except Exception as e:  # noqa: BLE001 - any failure ends the node; the message says which
        logger.error("node %d stops: %s", config.node_rank, e)
        _kill(workers)
        return 1
    for worker in workers:
        worker.join(timeout=STOP_JOIN_S)
    _kill(workers)  # any that did not leave (a hung rank)
    logger.info("node %d: node 0 stopped the world", config.node_rank)
    return 0


class TensorParallelRunner:
    """ModelRunner's interface (execute, release, num_blocks, model) over tp x pp ranks, on one or more nodes."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, progress: bool = True):
        self.workers = []
        store = rank = None
        with self._killing_workers_on_failure():
            if torchrun_rank() is None:
                store, config = _join_world(config, node_rank=0)
                rank = 0
                self.workers = _start_ranks(range(1, config.ranks_per_node), model_config, config)
            else:
                torch.manual_seed(GLOBAL_SEED)
            self.runner = ModelRunner(model_config, config, progress=progress, rank=rank, store=store)
        self.runner.parallel.set_timeout(config.step_timeout)
        self.keep_alive_interval = config.step_timeout / 3
        self.model = self.runner.model
        self.num_blocks = self.runner.num_blocks
        self.kv_spec = self.runner.kv_spec
        logger.info("parallel: tp %d x pp %d ranks on %d node(s); this node's others: %s",
                    config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes,
                    _describe(self.workers, 0))

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
            _kill(self.workers)
            self.workers = []
            with contextlib.suppress(Exception):  # the group is broken; leave it so a new engine can make one
                self.runner.parallel.leave()
            raise

    def close(self) -> None:
        """Stop every rank, on every node, and leave the world (the engine cannot step afterwards)."""
        if not torch.distributed.is_initialized():
            return
        with self._killing_workers_on_failure():
            self.runner.parallel.broadcast(("stop", None))  # a stopped rank's socket buffers it
        for worker in self.workers:
            worker.join(timeout=STOP_JOIN_S)
        _kill(self.workers)  # any that did not leave (a hung rank)
        self.workers = []
        self.runner.parallel.leave()
