"""Paged KV-cache block accounting with prefix caching (vLLM v1's KVCacheManager, nano-vllm's BlockManager).

Pure Python: this module only decides which block ids a request's tokens live in; the runner owns the tensors.

A full block is identified by a chained hash, hash((parent_block_hash, tuple(block_token_ids))), so a block
matches only when the whole prefix before it matches too. Free blocks sit in an LRU queue: a freed block that
holds a registered hash stays findable until allocation reuses it for new content (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from glmserve.types import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while this block is the registered holder of the hash (hash_to_block[block_hash] == block_id).
    block_hash: int | None = None
    # The block's tokens, checked on a hit: Python's tuple hash is unkeyed, so a crafted collision must not
    # hand one request another's KV.
    token_ids: tuple[int, ...] = ()


def _cache_salt(request: Request) -> tuple | None:
    """What a request's first block hash chains from: its LoRA adapter (one load of it), so blocks computed with
    different adapters, or without one, are never shared."""
    lora = request.sampling_params.lora_request
    return None if lora is None else ("lora", lora.lora_int_id)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain_block_hashes(token_ids: Sequence[int], block_size: int, hashes: list[int], num_tokens: int,
                       salt: tuple | None = None) -> list[int]:
    """Extend `hashes` (those of the leading blocks, already computed) to cover the full blocks of the first
    `num_tokens` of `token_ids`; returns it. The first block chains from `salt` (`_cache_salt`). Also what the
    data-parallel router keys its per-replica record with (engine/dp_router.py), so that it matches prompts exactly
    as the replicas' caches do."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[i - 1] if i else salt
        hashes.append(hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))))
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Block ids with ref_count 0; allocation pops from the head (least recently freed).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # request_id -> how many of its leading blocks cache_full_blocks has already handled.
        self._num_cached_blocks: dict[str, int] = {}
        # In tokens, counted once per admission: hit rate = prefix_cache_hits / prefix_cache_queries.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- stats -------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def reset_prefix_cache(self) -> None:
        """Forget every registered hash; blocks in use keep their content, nothing is findable any more."""
        for block_id in self.hash_to_block.values():
            self._drop_hash(self.blocks[block_id])
        self.hash_to_block.clear()

    # ---- lookup and allocation ---------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full blocks matching the start of request.token_ids, and the tokens they
        cover. For a request holding no blocks. Never the whole sequence: one token is always left to compute,
        since the step must produce logits for it."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._update_block_hashes(request, max_blocks * self.block_size)
        block_ids: list[int] = []
        for i, block_hash in enumerate(hashes[:max_blocks]):
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(request, i):
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> bool:
        """Make request.block_ids cover its computed tokens, the prefix-hit blocks and num_new_tokens more.
        Returns False, changing nothing, when the free pool is too small."""
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = _cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(num_required - len(request.block_ids) - len(new_computed_blocks), 0)
        # A hit block with no other user sits in the free pool, so taking it costs a free block too.
        num_free_hits = sum(1 for b in new_computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_free_hits > len(self.free_blocks):
            return False

        if not request.block_ids and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        # Touch the hits before allocating, so allocation cannot evict them.
        for block_id in new_computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
        request.block_ids.extend(new_computed_blocks)
        request.block_ids.extend(self._allocate_block() for _ in range(num_new_blocks))
        return True

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the hashes of the request's blocks made full by its first num_computed_tokens tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._update_block_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            # Already registered (a prefix hit), or a duplicate of a block registered first: keep that one.
            if block.block_hash is not None or hashes[i] in self.hash_to_block:
                continue
            block.block_hash = hashes[i]
            block.token_ids = self._block_tokens(request, i)
            self.hash_to_block[hashes[i]] = block.block_id
        self._num_cached_blocks[request.request_id] = num_full

    # ---- release -----------------------------------------------------------------------------------------

    def free(self, request: Request) -> None:
        """Release all of the request's blocks. Tail first, so the end of a sequence is evicted before its
        (more shareable) beginning."""
        for block_id in reversed(request.block_ids):
            self._release(block_id)
        request.block_ids.clear()
        self._num_cached_blocks.pop(request.request_id, None)

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Roll the request's KV back to its first num_tokens tokens, e.g. after rejected draft tokens."""
        num_keep = _cdiv(num_tokens, self.block_size)
        num_full = num_tokens // self.block_size
        for block_id in reversed(request.block_ids[num_keep:]):
            self._release(block_id)
        del request.block_ids[num_keep:]
        # A kept block that is no longer full will be overwritten, so its hash no longer describes it.
        for block_id in request.block_ids[num_full:]:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.hash_to_block[block.block_hash]
                self._drop_hash(block)
        del request.block_hashes[num_full:]
        if request.request_id in self._num_cached_blocks:
            self._num_cached_blocks[request.request_id] = min(self._num_cached_blocks[request.request_id], num_full)
        request.num_computed_tokens = min(request.num_computed_tokens, num_tokens)

    # ---- internals ---------------------------------------------------------------------------------------

    def _allocate_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: the content is about to be overwritten
            del self.hash_to_block[block.block_hash]
            self._drop_hash(block)
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            # A block with no cached content is worth nothing: reuse it before any cached one.
            if block.block_hash is None:
                self.free_blocks.move_to_end(block_id, last=False)

    @staticmethod
    def _drop_hash(block: Block) -> None:
        block.block_hash = None
        block.token_ids = ()

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        return tuple(request.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def _update_block_hashes(self, request: Request, num_tokens: int) -> list[int]:
        """Extend request.block_hashes to cover the full blocks of its first num_tokens tokens; old entries are
        kept, so each block is hashed once over the request's life."""
        return chain_block_hashes(request.token_ids, self.block_size, request.block_hashes, num_tokens,
                                  _cache_salt(request))
