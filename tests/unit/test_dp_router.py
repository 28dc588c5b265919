"""The data-parallel router: prefix affinity by the replicas' own block hashes, load, balance, LRU-bounded records."""

from glmserve.engine.dp_router import AFFINITY, BALANCE, LOAD, CacheAwareRouter, RouterOptions
from glmserve.engine.kv_cache import KVCacheManager, chain_block_hashes
from glmserve.types import Request, SamplingParams


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_its_block_hashes_are_the_kv_caches():
    """A prompt matches in the router exactly as it would in a replica's cache: same chained hashes."""
    tokens = _tokens(5, 40)
    kv = KVCacheManager(8, block_size=16)
    request = Request("r", tokens, SamplingParams())
    kv.allocate_slots(request, 40)
    kv.cache_full_blocks(request, 40)
    router = CacheAwareRouter(2, 16, 8)
    router.route(tokens)
    assert list(reversed(router.records[0].hashes)) == request.block_hashes and len(request.block_hashes) == 2


def test_new_prompts_go_to_the_least_loaded_replica_then_the_emptier_record():
    router = CacheAwareRouter(3, 4, 100)
    assert [router.route(_tokens(100 * i, 9)) for i in range(3)] == [0, 1, 2]  # loads 0, 1, 2 apart
    router.finish(1)
    assert router.route(_tokens(1000, 9)) == 1
    for replica in (0, 1, 2):
        router.finish(replica)
    router.route(_tokens(2000, 12))  # replica 0 (lowest index among equals) now records 3 more blocks
    router.finish(0)
    assert router.route(_tokens(3000, 4)) == 2  # loads equal: the smallest record (2 blocks) wins
    assert router.decisions == {AFFINITY: 0, LOAD: 6, BALANCE: 0}


def test_a_follow_up_goes_to_the_replica_holding_its_prefix_even_when_busier():
    router = CacheAwareRouter(2, 4, 100)
    first, reply = _tokens(0, 10), [77, 78, 79, 80, 81]
    replica = router.route(first)
    router.finish(replica, first + reply)  # the whole sequence is cached there now: 3 full blocks
    other = router.route(_tokens(500, 8))  # the emptier record
    assert other != replica
    assert router.route(_tokens(900, 8)) == replica  # the less loaded
    router.finish(other)
    assert router.loads[replica] == 1 and router.loads[other] == 0
    assert router.route(first + reply + _tokens(50, 6)) == replica  # 12 of its 21 tokens held there
    assert router.decisions[AFFINITY] == 1


def test_a_short_match_below_the_threshold_goes_by_load():
    router = CacheAwareRouter(2, 4, 100, RouterOptions(cache_threshold=0.5))
    router.route(_tokens(0, 8))  # replica 0 holds 2 blocks (8 tokens)
    router.route(_tokens(100, 30))  # replica 1 (less loaded), which now holds 7 blocks
    router.finish(0)
    router.finish(1)
    assert router.route(_tokens(0, 8) + _tokens(200, 12)) == 0  # 8 of 20 = 0.4 < 0.5: by load, replica 0 (emptier)
    assert router.decisions[AFFINITY] == 0
    router.finish(0)
    assert router.route(_tokens(100, 30) + [1, 2]) == 1  # 28 of 32: affinity
    assert router.decisions[AFFINITY] == 1


def test_out_of_balance_loads_override_affinity():
    router = CacheAwareRouter(2, 4, 100, RouterOptions(balance_abs_threshold=2, balance_rel_threshold=1.5))
    prompt = _tokens(0, 20)
    assert router.route(prompt) == 0
    for _ in range(2):
        assert router.route(prompt) == 0  # affinity while 0 is at most 2 ahead
    assert router.loads == [3, 0]
    assert router.route(prompt) == 1 and router.decisions[BALANCE] == 1


def test_records_forget_their_least_recently_used_blocks_at_the_replicas_capacity():
    router = CacheAwareRouter(1, 4, capacity_blocks=3)
    old, new = _tokens(0, 8), _tokens(100, 8)
    router.route(old)
    router.route(new)  # 4 blocks for 3 places: `old`'s last block goes, its first (the shared prefix) stays
    record = router.records[0]
    assert len(record.hashes) == 3
    assert record.matched_blocks(_hashes(router, old)) == 1 and record.matched_blocks(_hashes(router, new)) == 2
    router.route(old)  # touched again: now `new`'s last block is the oldest
    assert record.matched_blocks(_hashes(router, old)) == 2 and record.matched_blocks(_hashes(router, new)) == 1


def _hashes(router: CacheAwareRouter, tokens: list[int]) -> list[int]:
    return chain_block_hashes(tokens, router.block_size, [], len(tokens))


def test_with_prefix_caching_off_routing_is_by_load_only():
    router = CacheAwareRouter(2, 4, 100, RouterOptions(prefix_affinity=False))
    prompt = _tokens(0, 20)
    assert [router.route(prompt) for _ in range(4)] == [0, 1, 0, 1]
    assert not router.records[0].hashes and router.decisions[AFFINITY] == 0
