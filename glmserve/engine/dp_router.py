"""Which data-parallel replica gets a request: by prefix-cache affinity, else by load (SGLang's cache-aware router).

The router keeps, per replica, an approximate record of the prefix cache it holds: the chained block hashes of the
token sequences it was sent (prompts when routed, whole sequences when they finish), in LRU order and bounded by
the replica's KV pool in blocks, as the replica's own cache evicts its least recently used blocks. The hashes are
the replicas' own (`kv_cache.chain_block_hashes`), so a prompt's match length is counted in the blocks a replica
would find. SGLang's router approximates the same way, with a radix tree of text per worker and LRU eviction by
size; no replica reports its evictions back.

A request goes, in order of precedence, to:
1. the least loaded replica when the loads are out of balance (the largest above the smallest by more than
   `balance_abs_threshold` requests and by a factor above `balance_rel_threshold`);
2. the replica with the longest match, when that match covers at least `cache_threshold` of the prompt;
3. the least loaded replica (ties: the smaller record, which has more room to cache, then the lower index).
The thresholds default to SGLang's router's (0.3, 64, 1.5). Load is the requests routed and not yet finished.
Pure Python and single-threaded (the engine thread calls it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from glmserve.engine.kv_cache import chain_block_hashes

AFFINITY, LOAD, BALANCE = "affinity", "load", "balance"  # why a replica was chosen (a metrics label)


@dataclass(frozen=True, slots=True)
class RouterOptions:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    prefix_affinity: bool = True  # off with prefix caching off: no replica holds anything to reuse


class _CacheRecord:
    """The block hashes one replica is believed to hold, least recently used first."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self.hashes: OrderedDict[int, None] = OrderedDict()

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are held (chained hashes: a held block implies its parents)."""
        n = 0
        while n < len(hashes) and hashes[n] in self.hashes:
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):  # the first block touched last: a prefix outlives its continuations, as the
            self.hashes[h] = None  # replicas free a sequence's blocks tail first
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)


class CacheAwareRouter:
    def __init__(self, num_replicas: int, block_size: int, capacity_blocks: int,
                 options: RouterOptions = RouterOptions()):
        self.block_size = block_size
        self.options = options
        self.records = [_CacheRecord(capacity_blocks) for _ in range(num_replicas)]
        self.loads = [0] * num_replicas
        self.routed = [0] * num_replicas  # requests sent to each replica, ever
        self.decisions = {AFFINITY: 0, LOAD: 0, BALANCE: 0}

    def route(self, prompt_token_ids: Sequence[int]) -> int:
        """The replica for a new request; counts it in that replica's load and record."""
        hashes = chain_block_hashes(prompt_token_ids, self.block_size, [], len(prompt_token_ids))
        replica, reason = self._choose(hashes, len(prompt_token_ids))
        self.decisions[reason] += 1
        self.loads[replica] += 1
        self.routed[replica] += 1
        if self.options.prefix_affinity:
            self.records[replica].insert(hashes)
        return replica

    def finish(self, replica: int, token_ids: Sequence[int] | None = None) -> None:
        """A request routed to `replica` finished or was aborted; `token_ids`, its whole sequence, if known, is now
        cached there too (a multi-turn chat's next prompt starts with it)."""
        self.loads[replica] -= 1
        if token_ids is not None and self.options.prefix_affinity:
            self.records[replica].insert(chain_block_hashes(token_ids, self.block_size, [], len(token_ids)))

    def _choose(self, hashes: list[int], num_tokens: int) -> tuple[int, str]:
        o, loads = self.options, self.loads
        least = min(range(len(loads)), key=lambda i: (loads[i], len(self.records[i].hashes), i))
        most = max(loads)
        if most - loads[least] > o.balance_abs_threshold and most > loads[least] * o.balance_rel_threshold:
            return least, BALANCE
        if o.prefix_affinity and hashes:
            matched = [record.matched_blocks(hashes) for record in self.records]
            best = max(range(len(loads)), key=lambda i: (matched[i], -loads[i], -i))
            if matched[best] and matched[best] * self.block_size >= o.cache_threshold * num_tokens:
                return best, AFFINITY
        return least, LOAD
