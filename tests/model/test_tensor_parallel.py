"""Tensor parallelism on torch.distributed (gloo, 2 CPU processes): the sharded model's logits equal tp=1's."""

import socket

import torch
import torch.multiprocessing as mp

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import AttentionMetadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(directory: str, tp: int) -> torch.Tensor:
    runner = ModelRunner(ModelConfig.from_pretrained(directory),
                         EngineConfig(model=directory, num_kv_blocks=8, tensor_parallel_size=tp), progress=False)
    tokens = torch.arange(3, 40) % 1000
    meta = AttentionMetadata.build([0], [len(tokens)], [[0, 1, 2]], runner.block_size, runner.device)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(tokens, torch.arange(len(tokens)), meta))


def _worker(rank: int, directory: str, port: int, results) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    results[rank] = _logits(directory, tp=2)
    torch.distributed.destroy_process_group()


def test_tp2_logits_equal_tp1(checkpoints):
    directory = str(checkpoints("glm45"))
    expected = _logits(directory, tp=1)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, directory, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        for rank in range(2):
            assert (results[rank] - expected).abs().max().item() <= 1e-4
