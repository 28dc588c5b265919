"""Memory planning for long contexts, with the scheduler and KV manager alone (no model): how many 8K-token requests
a 2 GiB pool holds with an fp32 and an FP8 KV cache, and a long prompt's chunked prefill beside decoding requests."""

import pytest

from glmserve.engine.kv_cache import KVCacheManager
from glmserve.engine.kv_planning import kv_bytes_per_token, num_blocks_for_budget
from glmserve.engine.scheduler import Scheduler
from glmserve.types import Request, SamplingParams, StepOutput

# bench-57m's attention: 4 layers, 2 KV heads of 64 dims.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 64, 16


@pytest.mark.parametrize("itemsize,expected", [(4, 64), (1, 256)])
def test_8k_requests_in_a_2_gib_pool(itemsize, expected):
    """fp32: 4 KiB per token, 2 GiB / (8192 x 4 KiB) = 64 requests at once; FP8: 1 KiB per token, 4x as many."""
    per_token = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, itemsize)
    assert per_token == 4096 * itemsize // 4
    num_blocks = num_blocks_for_budget(2 * 2**30, BLOCK_SIZE, per_token)
    scheduler = Scheduler(KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False),
                          max_num_seqs=1024, max_num_batched_tokens=8192 * 1024)
    for i in range(expected + 10):  # 8191 prompt tokens and 1 output token: 8192 tokens, 512 blocks each
        prompt = [(i * 8191 + j) % 30000 + 1 for j in range(8191)]
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
    output = scheduler.schedule()
    assert len(output.chunks) == scheduler.num_running == expected
    assert scheduler.num_waiting == 10 and not output.preempted_request_ids
    assert scheduler.kv_cache.num_free_blocks == num_blocks - expected * 512


@pytest.mark.parametrize("threshold", [0, 1000])
def test_long_prompt_never_stalls_decoding_requests(threshold):
    """A 100,000-token prompt arrives while two requests decode: every step until it is prefilled, both decode one
    token, and the prompt takes the rest of the budget (or --long-prefill-token-threshold's cap) as one chunk."""
    budget = 2048
    scheduler = Scheduler(KVCacheManager(8192, BLOCK_SIZE), max_num_batched_tokens=budget,
                          long_prefill_token_threshold=threshold)
    decoders = [Request(f"d{i}", [i + 1] * 10, SamplingParams(max_tokens=None, ignore_eos=True)) for i in range(2)]
    long = Request("long", list(range(1, 100_001)), SamplingParams(max_tokens=4, ignore_eos=True))
    for r in decoders:
        scheduler.add_request(r)
    _step(scheduler)  # the two prompts
    scheduler.add_request(long)
    steps = 0
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = _step(scheduler)
        chunks = {c.request.request_id: c for c in out.chunks}
        assert [chunks[r.request_id].num_tokens for r in decoders] == [1, 1]
        assert chunks["long"].num_tokens == min(threshold or budget - 2, 100_000 - chunks["long"].start_pos)
        steps += 1
    assert steps == -(-100_000 // (threshold or budget - 2))


def _step(scheduler: Scheduler):
    out = scheduler.schedule()
    sampled = [[7] if c.sample else [] for c in out.chunks]
    scheduler.update_from_output(out, StepOutput(sampled))
    return out
