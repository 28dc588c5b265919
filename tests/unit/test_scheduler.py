"""Scheduler with a fake runner: chunked prefill, decode, prefix caching, preemption, aborts, drafts, stops.

The fake runner keeps a simulated paged KV store: it writes each chunk's tokens through the request's block
table and samples from what it reads back, so a wrong block table, a bad prefix hit or a clobbered shared block
changes the output (or trips an assertion) instead of passing silently.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kv_cache import assert_kv_invariants

from glmserve.engine.kv_cache import KVCacheManager
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.stop import check_stop
from glmserve.types import Request, RequestStatus, SamplingParams, SchedulerOutput, StepOutput

VOCAB = 64
EOS = 0


def model(context: list[int]) -> int:
    """The fake model's greedy next token: a deterministic function of the whole context."""
    return hash(tuple(context)) % VOCAB


class FakeRunner:
    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.kv_store: dict[int, int] = {}  # slot -> token id

    def _slot(self, request: Request, pos: int) -> int:
        bs = self.kv.block_size
        return request.block_ids[pos // bs] * bs + pos % bs

    def execute(self, output: SchedulerOutput) -> StepOutput:
        sampled = []
        for chunk in output.chunks:
            request = chunk.request
            for offset, token_id in enumerate(chunk.token_ids + chunk.draft_token_ids):
                pos = chunk.start_pos + offset
                block = self.kv.blocks[request.block_ids[pos // self.kv.block_size]]
                assert block.ref_count == 1 and block.block_hash is None, "write into a shared or cached block"
                self.kv_store[self._slot(request, pos)] = token_id
            num_known = chunk.start_pos + len(chunk.token_ids)
            context = [self.kv_store[self._slot(request, pos)] for pos in range(num_known)]
            assert context == request.token_ids[:num_known], "KV read back through the block table differs"
            sampled.append(self._verify(context, chunk.draft_token_ids) if chunk.sample else [])
        return StepOutput(sampled)

    @staticmethod
    def _verify(context: list[int], drafts: list[int]) -> list[int]:
        """Greedy verification: accept drafts while they equal the model's token, then one more token."""
        out = []
        for draft in drafts:
            out.append(model(context))
            if draft != out[-1]:
                return out
            context = context + [draft]
        out.append(model(context))
        return out


def make_request(request_id, prompt, max_tokens=8, eos=frozenset(), **kwargs) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), eos_token_ids=eos, **kwargs)


def reference(request: Request) -> tuple[list[int], str]:
    """The request generated alone, one token at a time: what any schedule must reproduce."""
    r = Request("ref", list(request.prompt_token_ids), request.sampling_params, request.eos_token_ids,
                request.max_model_len)  # fmt: skip
    while True:
        token_id = model(r.token_ids)
        r.append_output_token(token_id)
        status = check_stop(r, token_id)
        if status is not None:
            return r.output_token_ids, status.value


def run(
    scheduler: Scheduler, requests: list[Request], runner=None, proposer=None, abort=None
) -> dict[str, tuple[list[int], str]]:
    """Drive schedule/execute/update to the end, checking invariants every step."""
    runner = runner or FakeRunner(scheduler.kv_cache)
    for r in requests:
        scheduler.add_request(r)
    tokens = {r.request_id: [] for r in requests}
    reasons = {}
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        was_running = {r.request_id for r in scheduler.running}
        output = scheduler.schedule()
        assert not output.is_empty
        if output.preempted_request_ids:  # no admissions in a step that preempts
            scheduled = {c.request.request_id for c in output.chunks}
            assert scheduled <= was_running - set(output.preempted_request_ids)
        assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
        assert scheduler.num_running <= scheduler.max_num_seqs
        assert_kv_invariants(scheduler.kv_cache, scheduler.running + list(scheduler.waiting))
        step = runner.execute(output)
        for r in abort(scheduler) if abort else []:
            reasons[r.request_id] = "abort"
        for out in scheduler.update_from_output(output, step):
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        assert_kv_invariants(scheduler.kv_cache, scheduler.running + list(scheduler.waiting))
        if proposer:
            proposer(scheduler)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks
    assert_kv_invariants(scheduler.kv_cache, [])
    return {rid: (tokens[rid], reasons[rid]) for rid in tokens}


def make_proposer(rng: random.Random, max_drafts: int = 4):
    """Proposes the true continuation for decoding requests, sometimes corrupted, so drafts are partly rejected."""

    def propose(scheduler: Scheduler) -> None:
        for r in scheduler.running:
            if r.num_computed_tokens != r.num_tokens - 1:
                continue
            context, drafts = list(r.token_ids), []
            for _ in range(rng.randint(0, max_drafts)):
                token_id = model(context) if rng.random() < 0.7 else rng.randrange(VOCAB)
                drafts.append(token_id)
                context.append(token_id)
            r.draft_token_ids = drafts

    return propose


def expected(requests: list[Request]) -> dict[str, tuple[list[int], str]]:
    return {r.request_id: reference(r) for r in requests}


# ---- basic flow ------------------------------------------------------------------------------------------


def test_prefill_then_decode():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4))
    requests = [make_request("a", range(1, 10), max_tokens=5)]
    want = expected(requests)
    assert run(scheduler, requests) == want
    assert want["a"][1] == "length" and len(want["a"][0]) == 5


def test_schedule_shapes_prefill_and_decode_chunks():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4))
    r = make_request("a", range(1, 10))
    scheduler.add_request(r)
    out = scheduler.schedule()
    [chunk] = out.chunks
    assert chunk.token_ids == list(range(1, 10)) and chunk.start_pos == 0 and chunk.sample
    assert len(r.block_ids) == 3 and r.status is RequestStatus.RUNNING and r.num_cached_tokens == 0
    [res] = scheduler.update_from_output(out, StepOutput([[42]]))
    assert res.new_token_ids == [42] and not res.finished and res.num_prompt_tokens == 9
    out = scheduler.schedule()
    [chunk] = out.chunks
    assert chunk.token_ids == [42] and chunk.start_pos == 9 and chunk.sample


def test_chunked_prefill_under_token_budget():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4), max_num_batched_tokens=8)
    r = make_request("a", range(1, 21), max_tokens=2)
    scheduler.add_request(r)
    runner = FakeRunner(scheduler.kv_cache)
    shapes = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        shapes += [(c.start_pos, len(c.token_ids), c.sample) for c in out.chunks]
        outputs = scheduler.update_from_output(out, runner.execute(out))
        assert bool(outputs) == out.chunks[0].sample  # nothing to report for a mid-prefill chunk
    assert shapes == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True)]
    assert r.output_token_ids == reference(r)[0]


def test_long_prefill_token_threshold_caps_each_request():
    scheduler = Scheduler(KVCacheManager(num_blocks=32, block_size=4), long_prefill_token_threshold=3)
    a, b = make_request("a", range(1, 8)), make_request("b", range(10, 15))
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()
    assert [(c.request.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [("a", 0, 3), ("b", 0, 3)]
    # The full flow still reproduces the reference.
    scheduler = Scheduler(KVCacheManager(num_blocks=32, block_size=4), long_prefill_token_threshold=3)
    requests = [make_request("a", range(1, 8)), make_request("b", range(10, 15))]
    assert run(scheduler, requests) == expected(requests)


def test_mixed_prefill_and_decode_in_one_step():
    scheduler = Scheduler(KVCacheManager(num_blocks=32, block_size=4))
    runner = FakeRunner(scheduler.kv_cache)
    a = make_request("a", range(1, 6))
    scheduler.add_request(a)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    b = make_request("b", range(20, 31))
    scheduler.add_request(b)
    out = scheduler.schedule()
    assert [(c.request.request_id, c.start_pos, len(c.token_ids), c.sample) for c in out.chunks] == [
        ("a", 5, 1, True),
        ("b", 0, 11, True),
    ]
    outputs = scheduler.update_from_output(out, runner.execute(out))
    assert [o.request_id for o in outputs] == ["a", "b"]


def test_max_num_seqs():
    scheduler = Scheduler(KVCacheManager(num_blocks=64, block_size=4), max_num_seqs=2)
    requests = [make_request(f"r{i}", range(i + 1, i + 6), max_tokens=3) for i in range(3)]
    for r in requests:
        scheduler.add_request(r)
    out = scheduler.schedule()
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    requests = [make_request(f"r{i}", range(i + 1, i + 6), max_tokens=3) for i in range(3)]
    assert run(Scheduler(KVCacheManager(num_blocks=64, block_size=4), max_num_seqs=2), requests) == expected(requests)


def test_fcfs_head_of_line_blocks_smaller_requests():
    scheduler = Scheduler(KVCacheManager(num_blocks=4, block_size=4))
    scheduler.add_request(make_request("a", range(1, 9), max_tokens=4))  # 2 blocks now
    scheduler.add_request(make_request("big", range(1, 13), max_tokens=4))  # needs 3 blocks now
    scheduler.add_request(make_request("small", [1], max_tokens=1))
    out = scheduler.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]  # small would fit, but big is first
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]


def test_stop_on_eos_and_stop_reason():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4))
    prompt = list(range(1, 6))
    eos = frozenset({model(prompt + [model(prompt)])})  # the second output token
    r = Request("a", prompt, SamplingParams(max_tokens=10, stop_token_ids=[99]), eos_token_ids=eos)
    assert run(scheduler, [r]) == {"a": (reference(r)[0], "stop")}
    assert r.num_output_tokens == 2 and r.stop_reason is None


def test_max_model_len_stops_generation():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4))
    r = make_request("a", range(1, 6), max_tokens=None, max_model_len=8)
    assert run(scheduler, [r])["a"][1] == "length"
    assert r.num_tokens == 8


def test_add_request_validation():
    scheduler = Scheduler(KVCacheManager(num_blocks=2, block_size=4))
    scheduler.add_request(make_request("a", [1], max_tokens=7))
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add_request(make_request("b", [1], max_tokens=8))


# ---- prefix caching --------------------------------------------------------------------------------------


def test_prefix_cache_hit_reproduces_outputs():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)  # one KV store across both runs: the hits read what the first run wrote
    shared = list(range(1, 14))
    first = [make_request("a", shared + [20, 21])]
    assert run(scheduler, first, runner) == expected(first)
    second = [make_request("b", shared + [30]), make_request("c", shared + [20, 21])]
    assert run(scheduler, second, runner) == expected(second)
    assert [r.num_cached_tokens for r in second] == [12, 12]
    assert kv.prefix_cache_hits == 24 and kv.prefix_cache_queries == 15 + 14 + 15
    assert scheduler.stats().prefix_cache_hits == 24


def test_preempted_request_hits_its_own_prefix_and_keeps_first_num_cached():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    requests = [
        make_request("a", range(1, 8), max_tokens=8),  # grows to 15 tokens: 4 blocks
        make_request("b", range(30, 36), max_tokens=4),  # grows to 10 tokens: 3 blocks
    ]
    assert run(scheduler, requests, runner) == expected(requests)
    assert [r.num_preemptions for r in requests] == [0, 1]
    assert requests[1].num_cached_tokens == 0  # set on its first schedule only
    assert kv.prefix_cache_hits == 4  # b found its own full block again after preemption


# ---- preemption ------------------------------------------------------------------------------------------


def test_preempt_last_running_and_skip_admission():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    a, b = make_request("a", range(1, 9), max_tokens=8), make_request("b", range(20, 28), max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()  # both prefills: all 4 blocks
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.add_request(make_request("c", [5], max_tokens=1))
    out = scheduler.schedule()  # a needs a block: b (last) is preempted; b then cannot schedule itself
    assert out.preempted_request_ids == ["b"]
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]  # b at the front; c not admitted
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert_kv_invariants(kv, [a, b])


def test_request_preempts_itself():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    a, b = make_request("a", range(1, 4), max_tokens=8), make_request("b", range(20, 28), max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()  # a: 1 block, b: 2 blocks; the pool is full
    scheduler.update_from_output(out, runner.execute(out))
    out = scheduler.schedule()  # a's next token fits its block; b needs a new one and is the last: itself
    assert out.preempted_request_ids == ["b"]
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert scheduler.running == [a] and list(scheduler.waiting) == [b]
    assert_kv_invariants(kv, [a, b])


def test_preemption_under_pressure_all_finish_correctly():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    scheduler = Scheduler(kv, max_num_batched_tokens=16)
    requests = [make_request(f"r{i}", range(i, i + 6 + i % 5), max_tokens=12) for i in range(8)]
    want = expected(requests)
    assert run(scheduler, requests) == want
    assert sum(r.num_preemptions for r in requests) > 0
    assert kv.num_free_blocks == kv.num_blocks


# ---- aborts ----------------------------------------------------------------------------------------------


def test_abort_frees_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=1)
    a, b = make_request("a", range(1, 10)), make_request("b", range(1, 10))
    scheduler.add_request(a)
    scheduler.add_request(b)
    scheduler.schedule()
    assert kv.num_free_blocks < 16
    aborted = scheduler.abort_requests(["a", "b", "missing"])
    assert aborted == [a, b]
    assert all(r.status is RequestStatus.FINISHED_ABORTED and r.block_ids == [] for r in aborted)
    assert kv.num_free_blocks == 16 and not scheduler.has_unfinished_requests()
    assert scheduler.get_request("a") is None


def test_abort_between_schedule_and_update_is_skipped():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    a, b = make_request("a", range(1, 10)), make_request("b", range(20, 30))
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()
    step = runner.execute(out)
    scheduler.abort_requests(["a"])
    outputs = scheduler.update_from_output(out, step)
    assert [o.request_id for o in outputs] == ["b"]
    assert a.num_output_tokens == 0 and a.block_ids == []
    assert_kv_invariants(kv, [b])


# ---- speculative drafts ----------------------------------------------------------------------------------


def decoding_request(scheduler: Scheduler, runner: FakeRunner, prompt, **kwargs) -> Request:
    r = make_request("a", prompt, **kwargs)
    scheduler.add_request(r)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    return r


def true_continuation(r: Request, n: int) -> list[int]:
    context = list(r.token_ids)
    for _ in range(n):
        context.append(model(context))
    return context[r.num_tokens :]


def test_drafts_accepted_and_rejected_roll_back():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    r = decoding_request(scheduler, runner, range(1, 7), max_tokens=20)  # 7 tokens, 6 computed
    good = true_continuation(r, 6)
    r.draft_token_ids = good[:2] + [(good[2] + 1) % VOCAB, 1, 2]  # 2 accepted, then a rejection
    out = scheduler.schedule()
    [chunk] = out.chunks
    assert chunk.token_ids == r.token_ids[6:] and len(chunk.draft_token_ids) == 5
    assert len(r.block_ids) == 3  # 12 slots for 7 tokens + 5 drafts
    [res] = scheduler.update_from_output(out, runner.execute(out))
    assert res.new_token_ids == good[:3]
    assert r.num_tokens == 10 and r.num_computed_tokens == 9 and r.draft_token_ids == []
    assert len(r.block_ids) == 3  # ceil(9 / 4): the rejected drafts' slots are rolled back
    assert_kv_invariants(kv, [r])
    r.draft_token_ids = [(good[3] + 1) % VOCAB] * 3  # all rejected
    out = scheduler.schedule()
    [res] = scheduler.update_from_output(out, runner.execute(out))
    assert res.new_token_ids == [good[3]] and len(r.block_ids) == 3
    assert_kv_invariants(kv, [r])


def test_stop_inside_accepted_run_drops_the_rest():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    prompt = list(range(1, 7))
    probe = make_request("p", prompt)
    probe.append_output_token(model(prompt))
    good = [probe.token_ids[-1]] + true_continuation(probe, 4)
    r = Request("a", prompt, SamplingParams(max_tokens=20, stop_token_ids=[good[2]]))
    scheduler.add_request(r)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    r.draft_token_ids = good[1:5]  # all four accepted, but the second one is a stop token
    out = scheduler.schedule()
    [res] = scheduler.update_from_output(out, runner.execute(out))
    assert res.finished and res.finish_reason == "stop" and res.stop_reason == good[2]
    assert res.new_token_ids == good[1:3] and r.output_token_ids == good[:3]
    assert kv.num_free_blocks == kv.num_blocks


def test_drafts_capped_by_max_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv)
    runner = FakeRunner(kv)
    r = decoding_request(scheduler, runner, range(1, 5), max_tokens=3)  # 5 tokens; at most 7
    r.draft_token_ids = true_continuation(r, 5)
    [chunk] = scheduler.schedule().chunks
    assert len(chunk.draft_token_ids) == 2


def test_drafts_reproduce_greedy_outputs():
    rng = random.Random(0)
    requests = [make_request(f"r{i}", range(i, i + 5 + i), max_tokens=15) for i in range(6)]
    want = expected(requests)
    scheduler = Scheduler(KVCacheManager(num_blocks=24, block_size=4), max_num_batched_tokens=24)
    assert run(scheduler, requests, proposer=make_proposer(rng)) == want


# ---- randomized ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_requests=st.integers(1, 10),
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 12),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    threshold=st.sampled_from([0, 1, 3, 8]),
    prefix_caching=st.booleans(),
    speculative=st.booleans(),
    abort_rate=st.sampled_from([0.0, 0.05]),
)
def test_random_workloads_keep_invariants(
    seed, num_requests, block_size, spare_blocks, max_num_seqs, max_num_batched_tokens, threshold,
    prefix_caching, speculative, abort_rate,
):  # fmt: skip
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    requests = []
    for i in range(num_requests):
        prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        requests.append(
            Request(
                f"r{i}",
                prompt,
                SamplingParams(max_tokens=rng.randint(1, 10), min_tokens=rng.choice([0, 1])),
                eos_token_ids=frozenset({EOS}),
                max_model_len=rng.choice([None, len(prompt) + rng.randint(1, 6)]),
            )
        )
    max_len = max(min(r.num_prompt_tokens + r.sampling_params.max_tokens, r.max_model_len or 10**9) for r in requests)
    num_blocks = -(-max_len // block_size) + spare_blocks
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(kv, max_num_seqs, max_num_batched_tokens, threshold)
    want = expected(requests)

    def abort(s: Scheduler) -> list[Request]:
        ids = [rid for rid in s.requests if rng.random() < abort_rate]
        return s.abort_requests(ids)

    got = run(scheduler, requests, proposer=make_proposer(rng) if speculative else None, abort=abort)
    for r in requests:
        tokens, reason = got[r.request_id]
        if reason == "abort":
            assert r.status is RequestStatus.FINISHED_ABORTED
            assert tokens == want[r.request_id][0][: len(tokens)]
        else:
            assert (tokens, reason) == want[r.request_id]
            assert r.status.value == reason
