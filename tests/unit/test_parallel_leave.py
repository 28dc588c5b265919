"""Leaving the world must end gloo's run-loop threads. A ProcessGroup kept alive after destroy_process_group keeps
them running, and at interpreter exit one of them can abort the process (the multi-node test's node 1 died with
SIGABRT after its workload had passed)."""

from pathlib import Path

import torch.distributed as dist

from glmserve.distributed.parallel import ParallelContext


def _gloo_threads() -> list[str]:
    """gloo's native run-loop threads (invisible to `threading`), by the names the kernel knows them by."""
    names = (task.joinpath("comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    return sorted(name for name in names if "gloo" in name)


def test_leave_destroys_the_group_and_its_threads():
    before = _gloo_threads()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    context = ParallelContext(tp_size=1, group=dist.group.WORLD)
    dist.broadcast_object_list(["a step"], src=0, group=context.group)
    assert len(_gloo_threads()) > len(before)  # the probe sees the threads it is meant to see end

    context.leave()

    assert not dist.is_initialized()
    assert context.group is None
    assert _gloo_threads() == before
    context.leave()  # a second leave (a failure path after close) is harmless
