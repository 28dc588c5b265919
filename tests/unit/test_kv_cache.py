"""KVCacheManager: paged allocation, ref counts, chained-hash prefix caching, LRU reuse, rollback."""

from collections import Counter

import pytest

from glmserve.engine.kv_cache import KVCacheManager
from glmserve.types import Request, SamplingParams

BS = 4  # block size in these tests


def assert_kv_invariants(kv: KVCacheManager, requests: list[Request]) -> None:
    """The accounting must agree with the requests holding blocks; used by the scheduler tests too."""
    holders = Counter(block_id for r in requests for block_id in r.block_ids)
    for r in requests:
        assert len(set(r.block_ids)) == len(r.block_ids), f"{r.request_id} holds a block twice"
    for block in kv.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == holders[block.block_id], f"block {block.block_id} ref count"
        assert (block.ref_count == 0) == (block.block_id in kv.free_blocks), f"block {block.block_id} free list"
    assert kv.num_free_blocks + sum(b.ref_count > 0 for b in kv.blocks) == kv.num_blocks
    for block_hash, block_id in kv.hash_to_block.items():
        assert kv.blocks[block_id].block_hash == block_hash
    assert sum(b.block_hash is not None for b in kv.blocks) == len(kv.hash_to_block)


def make_request(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=None))


def admit(kv: KVCacheManager, request: Request, num_new: int | None = None) -> int:
    """What the scheduler does for a waiting request; returns the prefix-cache hit in tokens."""
    blocks, num_cached = kv.get_computed_blocks(request)
    num_new = request.num_tokens - num_cached if num_new is None else num_new
    assert kv.allocate_slots(request, num_new, blocks)
    request.num_computed_tokens = num_cached
    return num_cached


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """What the scheduler does after a step computed num_tokens more of the request."""
    request.num_computed_tokens += num_tokens
    kv.cache_full_blocks(request, request.num_computed_tokens)


def prefill(kv: KVCacheManager, request: Request) -> int:
    num_cached = admit(kv, request)
    compute(kv, request, request.num_tokens - num_cached)
    return num_cached


def test_allocate_and_free():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = make_request(range(9))  # 3 blocks
    assert admit(kv, r) == 0
    assert len(r.block_ids) == 3
    assert kv.num_free_blocks == 1
    assert kv.usage == pytest.approx(0.75)
    assert_kv_invariants(kv, [r])
    kv.free(r)
    assert r.block_ids == []
    assert kv.num_free_blocks == 4
    assert kv.usage == 0.0
    kv.free(r)  # a second free is a no-op, not a double free
    assert_kv_invariants(kv, [])


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    r = make_request(range(9))
    assert not kv.allocate_slots(r, 9)
    assert r.block_ids == [] and kv.num_free_blocks == 2
    assert kv.prefix_cache_queries == 0
    assert_kv_invariants(kv, [r])


def test_decode_grows_one_block_at_a_time():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request(range(4))
    prefill(kv, r)
    assert len(r.block_ids) == 1
    r.append_output_token(100)
    assert kv.allocate_slots(r, 1)  # token 5 needs a second block
    assert len(r.block_ids) == 2
    compute(kv, r, 1)
    for token in range(101, 104):
        r.append_output_token(token)
        assert kv.allocate_slots(r, 1)
        compute(kv, r, 1)
    assert len(r.block_ids) == 2  # 8 tokens fill two blocks exactly
    assert len(r.block_hashes) == 2
    assert_kv_invariants(kv, [r])


def test_shared_prefix_hits_and_ref_counts():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(list(range(10)), "a")  # blocks [0..3] [4..7] + partial
    assert prefill(kv, a) == 0
    b = make_request(list(range(8)) + [50, 51, 52], "b")
    assert prefill(kv, b) == 8
    assert b.num_computed_tokens == 11
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [kv.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    assert kv.prefix_cache_queries == 10 + 11 and kv.prefix_cache_hits == 8
    assert_kv_invariants(kv, [a, b])

    kv.free(a)
    assert [kv.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1]
    assert_kv_invariants(kv, [b])
    kv.free(b)
    assert kv.num_free_blocks == 10
    assert_kv_invariants(kv, [])
    # Freed blocks stay findable by hash until reused.
    c = make_request(list(range(8)) + [60], "c")
    assert admit(kv, c) == 8
    assert_kv_invariants(kv, [c])


def test_chained_hash_needs_the_whole_prefix():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = make_request(x + y + [0], "a")
    prefill(kv, a)
    b = make_request(z + y + [0], "b")
    # The same block content after a different prefix has a different hash and does not hit.
    assert admit(kv, b) == 0
    assert a.block_hashes[1] != b.block_hashes[1]
    compute(kv, b, b.num_tokens)
    assert len(kv.hash_to_block) == 4  # x, y-after-x, z, y-after-z
    c = make_request(x + y + [1], "c")
    assert admit(kv, c) == 8
    assert c.block_ids[:2] == a.block_ids[:2]
    assert_kv_invariants(kv, [a, b, c])


def test_hash_collision_is_not_a_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request([1, 2, 3, 4, 0], "a")
    prefill(kv, a)
    b = make_request([7, 7, 7, 7, 0], "b")
    b.block_hashes = list(a.block_hashes)  # pretend the unkeyed tuple hash collided
    assert admit(kv, b) == 0


def test_never_the_whole_prompt():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(range(8), "a")
    prefill(kv, a)
    b = make_request(range(8), "b")  # fully cached in two full blocks: back off one block
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 4 and blocks == a.block_ids[:1]
    c = make_request(range(9), "c")  # one token past the cached blocks: both hit
    assert kv.get_computed_blocks(c)[1] == 8
    d = make_request(range(3), "d")  # shorter than a block
    assert kv.get_computed_blocks(d) == ([], 0)


def test_lru_eviction_order():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request(range(100, 108), "a")  # two full blocks
    b = make_request(range(200, 209), "b")  # two full blocks + a partial one
    prefill(kv, a)
    prefill(kv, b)
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    kv.free(a)
    kv.free(b)
    # Tail of each sequence freed first; b's uncached partial block is reused before anything cached.
    assert list(kv.free_blocks) == [b_blocks[2], 5, a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    # Two new blocks take the uncached ones; the next evicts a's tail block, then a's head.
    d = make_request([1] * 9, "d")
    assert admit(kv, d, num_new=8) == 0
    assert d.block_ids == [b_blocks[2], 5]
    assert kv.get_computed_blocks(make_request(range(100, 109)))[1] == 8  # a still fully cached
    assert kv.allocate_slots(d, 9)  # a third block: evicts a's second block
    assert kv.get_computed_blocks(make_request(range(100, 109)))[1] == 4
    assert kv.get_computed_blocks(make_request(range(200, 209)))[1] == 8
    assert_kv_invariants(kv, [d])


def test_hit_on_free_block_counts_against_the_pool():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request(range(8), "a")
    prefill(kv, a)
    kv.free(a)
    b = make_request(list(range(8)) + list(range(50, 55)), "b")  # 2 hit blocks + 2 new blocks > 3
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    assert not kv.allocate_slots(b, b.num_tokens - num_cached, blocks)
    assert_kv_invariants(kv, [b])
    assert kv.allocate_slots(b, 4, blocks)  # a smaller chunk fits
    assert b.block_ids[:2] == blocks
    assert_kv_invariants(kv, [b])


def test_duplicate_full_block_keeps_first_mapping():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(range(5), "a")
    b = make_request(range(5), "b")
    admit(kv, a)
    admit(kv, b)  # same content, computed concurrently: no hit yet
    compute(kv, a, 5)
    compute(kv, b, 5)
    assert kv.hash_to_block == {a.block_hashes[0]: a.block_ids[0]}
    assert kv.blocks[b.block_ids[0]].block_hash is None
    kv.free(a)
    kv.free(b)
    assert_kv_invariants(kv, [])


def test_block_hashes_are_extended_not_recomputed():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    r = make_request(range(5))
    prefill(kv, r)
    first = r.block_hashes[0]
    r.block_hashes[0] = first + 1  # a recomputation would overwrite this
    for token in range(4):
        r.append_output_token(token)
        assert kv.allocate_slots(r, 1)
        compute(kv, r, 1)
    assert len(r.block_hashes) == 2
    assert r.block_hashes[1] == hash((first + 1, (4, 0, 1, 2)))


def test_truncate_rolls_back_draft_slots():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    r = make_request(range(6))
    prefill(kv, r)
    r.append_output_token(6)  # 7 tokens, 6 computed
    assert kv.allocate_slots(r, 1 + 5)  # the new token and 5 drafts: 12 slots, 3 blocks
    assert len(r.block_ids) == 3
    kv.truncate(r, 7)  # all drafts rejected
    assert len(r.block_ids) == 2
    assert kv.num_free_blocks == 8
    assert r.num_computed_tokens == 6
    assert_kv_invariants(kv, [r])


def test_truncate_drops_hashes_of_blocks_no_longer_full():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    r = make_request(range(10))
    prefill(kv, r)
    assert len(r.block_hashes) == 2 and len(kv.hash_to_block) == 2
    kv.truncate(r, 6)
    assert r.num_computed_tokens == 6
    assert len(r.block_ids) == 2 and len(r.block_hashes) == 1
    assert list(kv.hash_to_block.values()) == [r.block_ids[0]]
    assert_kv_invariants(kv, [r])
    # Recomputing the dropped block registers it again.
    compute(kv, r, 4)
    assert len(kv.hash_to_block) == 2
    assert_kv_invariants(kv, [r])


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = make_request(range(9), "a")
    prefill(kv, a)
    assert kv.hash_to_block == {} and a.block_hashes == []
    assert kv.get_computed_blocks(make_request(range(9), "b")) == ([], 0)
    assert kv.prefix_cache_queries == 0


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(range(9), "a")
    prefill(kv, a)
    kv.reset_prefix_cache()
    assert kv.hash_to_block == {}
    assert kv.get_computed_blocks(make_request(range(9), "b")) == ([], 0)
    assert_kv_invariants(kv, [a])
