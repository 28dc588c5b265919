"""Tensor-parallel state as an explicit object (no module globals), on torch.distributed.

Gloo on CPU, NCCL on CUDA. With tp_size 1 every collective is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when tp_size > 1

    def shard(self, size: int, what: str) -> int:
        """This rank's part of a dimension of `size` that is split across the TP group."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}")
        return size // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x


def init_parallel(tp_size: int, device: torch.device) -> ParallelContext:
    """Join the process group that torchrun (or a launcher) set up through the environment."""
    if tp_size == 1:
        return ParallelContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    if world != tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} needs {tp_size} processes, found {world}")
    return ParallelContext(tp_rank=dist.get_rank(), tp_size=tp_size, group=dist.group.WORLD)

