"""Tensor-parallel state as an explicit object (no module globals), on torch.distributed.

Gloo on CPU, NCCL on CUDA. With tp_size 1 every collective is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when tp_size > 1
    # Expert parallel: each rank holds whole routed experts (n_routed_experts / tp_size of them) instead of a
    # slice of every expert; the rest of the model stays tensor-parallel.
    expert_parallel: bool = False

    def shard(self, size: int, what: str) -> int:
        """This rank's part of a dimension of `size` that is split across the TP group."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}")
        return size // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's value (what all ranks can agree on, e.g. a KV cache size)."""
        if self.tp_size == 1:
            return value
        t = torch.tensor([value], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def set_timeout(self, seconds: float) -> None:
        """How long each collective may wait for the other ranks from now on. Loading runs under the long
        `COLLECTIVE_TIMEOUT` (ranks finish loading at different times); serving under `--step-timeout`, so that a
        hung rank fails the others' next collective within it."""
        if self.tp_size > 1:  # torch's only way to change a group's timeout after it is made
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), self.group)

    def round_trip(self, device: torch.device) -> None:
        """A collective every rank takes part in: it returns once all have reached it (or raises at the timeout)."""
        self.smallest(0, device)

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's message, on every rank (pickled through the group: step inputs, commands)."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


# How long a collective may wait for the other ranks (gloo and NCCL) while the ranks load the model; serving then
# sets the step timeout (`ParallelContext.set_timeout`).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def init_parallel(tp_size: int, device: torch.device, rank: int | None = None,
                  init_method: str | None = None, expert_parallel: bool = False) -> ParallelContext:
    """Join the TP process group: the one torchrun (or a launcher) describes in the environment, or, given rank
    and init_method, the one glmserve's own workers meet at (engine/tensor_parallel.py)."""
    if tp_size == 1:
        return ParallelContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if rank is None:
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=tp_size,
                                    timeout=COLLECTIVE_TIMEOUT)
    world = dist.get_world_size()
    if world != tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} needs {tp_size} processes, found {world}")
    return ParallelContext(tp_rank=dist.get_rank(), tp_size=tp_size, group=dist.group.WORLD,
                           expert_parallel=expert_parallel)

