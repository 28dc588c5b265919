"""Tensor- and pipeline-parallel state as an explicit object (no module globals), on torch.distributed.

Gloo on CPU, NCCL on CUDA. World = tp_size x pp_size ranks; global rank = pp_rank * tp_size + tp_rank, so a
pipeline stage's tensor-parallel ranks are neighbours (on one node when the nodes split the world evenly). With one
rank every collective is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None  # this stage's tensor-parallel ProcessGroup when tp_size > 1 (the model's all-reduces)
    # Expert parallel: each rank holds whole routed experts (n_routed_experts / tp_size of them) instead of a
    # slice of every expert; the rest of the model stays tensor-parallel.
    expert_parallel: bool = False
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """The global rank of this rank's tensor-parallel counterpart in stage pp_rank."""
        return pp_rank * self.tp_size + self.tp_rank

    def shard(self, size: int, what: str) -> int:
        """This rank's part of a dimension of `size` that is split across the TP group."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}")
        return size // self.tp_size

    def leave(self) -> None:
        """Destroy the process group and drop this context's reference to it. A ProcessGroup kept alive after
        destroy_process_group keeps gloo's run-loop threads alive; at interpreter exit one of them can free a last
        work's tensors while Python finalizes, and the process aborts ("terminate called without an active
        exception", pytorch/pytorch#179291)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        object.__setattr__(self, "group", None)  # frozen: the one field that changes, when the world ends

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's value, over the whole world (what all ranks can agree on, e.g. a KV cache
        size: the scheduler's block table addresses every stage's cache alike)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def set_timeout(self, seconds: float) -> None:
        """How long each collective may wait for the other ranks from now on. Loading runs under the long
        `COLLECTIVE_TIMEOUT` (ranks finish loading at different times); serving under `--step-timeout`, so that a
        hung rank fails the others' next collective within it."""
        if self.world_size == 1:
            return
        # torch's only way to change a group's timeout after it is made
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), None)
        if self.group is not None and self.pp_size > 1:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), self.group)

    def round_trip(self, device: torch.device) -> None:
        """A collective every rank takes part in: it returns once all have reached it (or raises at the timeout)."""
        self.smallest(0, device)

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's message, on every rank of the world (pickled: step inputs, commands)."""
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def send(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending a tensor to one rank (pipeline stages' hidden states); wait on what it returns."""
        return dist.isend(tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int, timeout: float) -> torch.Tensor:
        """Fill `tensor` from rank src; raises when nothing came within `timeout` seconds (a hung stage)."""
        dist.irecv(tensor, src).wait(timedelta(seconds=timeout))
        return tensor

    def send_object(self, obj: Any, dst: int) -> None:
        """A pickled object to one rank (the last stage's step result, to rank 0)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.long), dst)
        dist.send(data, dst)

    def recv_object(self, src: int, timeout: float) -> Any:
        size = self.recv(torch.empty(1, dtype=torch.long), src, timeout)
        data = self.recv(torch.empty(int(size.item()), dtype=torch.uint8), src, timeout)
        return pickle.loads(data.numpy().tobytes())


# How long a collective may wait for the other ranks (gloo and NCCL) while the ranks load the model; serving then
# sets the step timeout (`ParallelContext.set_timeout`).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def init_parallel(tp_size: int, device: torch.device, rank: int | None = None, store: Any = None,
                  expert_parallel: bool = False, pp_size: int = 1) -> ParallelContext:
    """Join the world of tp_size x pp_size ranks: the one torchrun (or a launcher) describes in the environment,
    or, given rank and store (distributed/rendezvous.py), the one glmserve's own processes meet at."""
    world_size = tp_size * pp_size
    if world_size == 1:
        return ParallelContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if rank is None:
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
    world = dist.get_world_size()
    if world != world_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} x --pipeline-parallel-size {pp_size} needs "
                         f"{world_size} processes, found {world}")
    global_rank = dist.get_rank()
    pp_rank, tp_rank = divmod(global_rank, tp_size)
    group = dist.group.WORLD if pp_size == 1 else None
    if pp_size > 1 and tp_size > 1:  # every rank makes every stage's group, in the same order
        for stage in range(pp_size):
            made = dist.new_group([stage * tp_size + r for r in range(tp_size)], timeout=COLLECTIVE_TIMEOUT)
            if stage == pp_rank:
                group = made
    return ParallelContext(tp_rank=tp_rank, tp_size=tp_size, group=group, expert_parallel=expert_parallel,
                           pp_rank=pp_rank, pp_size=pp_size)
