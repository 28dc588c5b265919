"""Where the ranks meet: a torch.distributed TCPStore at --dist-init-addr, and the nodes' agreement on the layout.

Rank 0 (node 0's engine process) hosts the store; every other process connects to it, and gives up with a clear
error after --dist-timeout instead of waiting forever for an address nobody answers on. Before any process group
is made, each node's first process publishes what it was launched with (--nnodes, the parallel sizes, ...) and its
--node-rank; node 0 checks that every node joined, that no rank is taken twice and that all agree, and publishes
its verdict, so a wrong launch ends every node with the same message within the timeout.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

POLL_S = 0.1


class RendezvousError(RuntimeError):
    """A launch that cannot form the world: unreachable address, disagreeing nodes, a node that never came."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dist-init-addr must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def open_store(address: str, is_master: bool, timeout: float) -> dist.Store:
    """Host (rank 0) or reach the store at address; the store's own waits time out after `timeout` seconds."""
    host, port = split_address(address)
    try:
        return dist.TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        if is_master:
            raise RendezvousError(f"cannot listen on --dist-init-addr {address} for the other ranks: {e}") from None
        raise RendezvousError(f"cannot reach the rendezvous at --dist-init-addr {address} within {timeout:g} s "
                              f"(is node 0 started, and is the address reachable from here?)") from None


def agree_on_nodes(store: dist.Store, node_rank: int, nnodes: int, launch: dict[str, Any], timeout: float) -> None:
    """Every node's launch settings must match node 0's. Node 0 waits for all nodes and rules; the others wait
    for its ruling. Raises RendezvousError on every node a wrong launch reaches."""
    if store.add(f"glmserve/claim/{node_rank}", 1) > 1:
        _fail(store, f"--node-rank {node_rank} is taken by another node (each node needs its own rank)")
    store.set(f"glmserve/node/{node_rank}", json.dumps(launch))
    deadline = time.monotonic() + timeout
    if node_rank == 0:
        _rule(store, nnodes, launch, deadline, timeout)
    else:  # a node that disagrees with node 0 says so at once (node 0 may be waiting for nodes that never come)
        theirs = _wait_for(store, "glmserve/node/0", deadline)
        if theirs is not None:
            _compare(store, 0, json.loads(theirs), node_rank, launch)
    verdict = _wait_for(store, "glmserve/verdict", deadline)
    if verdict is None:
        raise RendezvousError(f"node 0 did not confirm the launch within {timeout:g} s (--dist-timeout)")
    if verdict != "ok":
        raise RendezvousError(verdict)


def _rule(store: dist.Store, nnodes: int, launch: dict[str, Any], deadline: float, timeout: float) -> None:
    names = [f"glmserve/node/{r}" for r in range(nnodes)]
    while not store.check(names):
        if store.check(["glmserve/verdict"]):
            return  # another node found the launch wrong and said so
        if time.monotonic() > deadline:
            joined = sum(store.check([name]) for name in names)
            _fail(store, f"only {joined} of --nnodes {nnodes} nodes joined within {timeout:g} s (--dist-timeout): "
                         f"start every node with the same --nnodes and --dist-init-addr")
        time.sleep(POLL_S)
    for r in range(1, nnodes):
        _compare(store, 0, launch, r, json.loads(store.get(f"glmserve/node/{r}")))
    store.compare_set("glmserve/verdict", "", "ok")


def _compare(store: dist.Store, node0: int, launch0: dict[str, Any], r: int, launch: dict[str, Any]) -> None:
    differ = sorted(k for k in launch0.keys() | launch.keys() if launch0.get(k) != launch.get(k))
    if differ:
        _fail(store, f"node {r} was launched with different settings than node {node0}: "
                     + ", ".join(f"{k} {launch.get(k)} (node {node0}: {launch0.get(k)})" for k in differ))


def _fail(store: dist.Store, message: str) -> None:
    store.compare_set("glmserve/verdict", "", message)  # the first ruling stands
    raise RendezvousError(message)


def _wait_for(store: dist.Store, key: str, deadline: float) -> str | None:
    while time.monotonic() < deadline:
        if store.check([key]):
            return store.get(key).decode()
        time.sleep(POLL_S)
    return None
