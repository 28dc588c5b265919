"""Data parallelism: two replica processes behind AsyncEngineClient give the single engine's tokens, share the
requests, send a conversation's follow-up to the replica holding its prefix, and fail cleanly when one dies."""

import asyncio
import dataclasses
import functools
import os
import signal
import time

import pytest
from test_tensor_parallel import check_constrained, constrained_requests

from glmserve.config import EngineConfig
from glmserve.engine.data_parallel import DataParallelEngine
from glmserve.engine.engine_client import AsyncEngineClient, EngineDeadError
from glmserve.engine.llm_engine import LLMEngine
from glmserve.types import ParamError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _config(directory) -> EngineConfig:
    return EngineConfig(model=str(directory), num_kv_blocks=64, max_num_seqs=8)


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 1000 + 1 for j in range(5 + 9 * i)] for i in range(6)]


def _params(i: int) -> SamplingParams:
    """Greedy, and every third request sampled with a seed of its own (the same tokens on any replica)."""
    return SamplingParams(temperature=0.9, seed=i, max_tokens=12, ignore_eos=True) if i % 3 == 2 else GREEDY


def _requests(prompts: list[list[int]], constrained: dict) -> list[tuple[list[int], SamplingParams]]:
    """The prompts with `_params`, then the requests held to grammars (test_tensor_parallel.constrained_requests)."""
    return [(p, _params(i)) for i, p in enumerate(prompts)] + list(constrained.values())


def _single_engine_tokens(config: EngineConfig, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    engine = LLMEngine(config, progress=False)
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return [tokens[str(i)] for i in range(len(requests))]


async def _generate(client: AsyncEngineClient, request_id: str, prompt: list[int],
                    params: SamplingParams = GREEDY) -> list[int]:
    tokens = []
    async for output in await client.add_request(request_id, prompt, params):
        tokens += output.new_token_ids
    return tokens


def _dp_engine(directory, **kwargs) -> DataParallelEngine:
    return DataParallelEngine(functools.partial(LLMEngine, _config(directory), progress=False), 2, **kwargs)


async def _with_client(dp: DataParallelEngine, body):
    client = AsyncEngineClient(dp.start)
    client.start()
    try:
        await client.wait_ready()
        return await body(client)
    finally:
        client.shutdown()
        await asyncio.to_thread(client.join, 30)


def test_dp2_greedy_and_seeded_tokens_equal_one_engine_and_requests_spread(checkpoints):
    """Also for requests held to grammars: each replica matches its own (the front sends them serialized)."""
    directory = checkpoints("glm45")
    constrained = constrained_requests(str(directory))
    requests = _requests(_prompts(), constrained)
    expected = _single_engine_tokens(_config(directory), requests)
    dp = _dp_engine(directory)

    async def body(client):
        got = await asyncio.gather(*(_generate(client, str(i), *r) for i, r in enumerate(requests)))
        with pytest.raises(ParamError):  # checked before a replica is chosen, as the engine checks it
            await client.add_request("bad", [10**9], GREEDY)
        return got

    got = asyncio.run(_with_client(dp, body))
    assert got == expected
    check_constrained(str(directory), dict(zip(constrained, got[-len(constrained):])))
    assert sorted(dp.router.routed) == [4, 5]  # all at once: the loads alternate
    assert all(s.num_steps > 0 for s in dp.replica_stats())
    assert dp.router.loads == [0, 0]


def test_tensor_parallel_replicas_give_the_same_tokens(checkpoints):
    """dp 2 x tp 2: four processes, each replica starting its own rank."""
    directory = checkpoints("glm45")
    requests = _requests(_prompts()[:3], {"json": constrained_requests(str(directory))["json"]})
    expected = _single_engine_tokens(_config(directory), requests)
    config = dataclasses.replace(_config(directory), tensor_parallel_size=2)
    dp = DataParallelEngine(functools.partial(LLMEngine, config, progress=False), 2)

    async def body(client):
        return await asyncio.gather(*(_generate(client, str(i), *r) for i, r in enumerate(requests)))

    assert asyncio.run(_with_client(dp, body)) == expected
    assert dp.router.routed == [2, 2]


def test_a_conversations_follow_ups_hit_their_replicas_prefix_cache(checkpoints):
    """Three conversations, three turns each, turns sent one at a time: every follow-up goes to the replica of its
    conversation's first turn, and finds its whole previous turn (prompt and reply) cached there."""
    dp = _dp_engine(checkpoints("glm45"))

    async def body(client):
        history = {c: [100 + 50 * c + j for j in range(20)] for c in range(3)}
        placed: dict[int, set[int]] = {c: set() for c in range(3)}
        for turn in range(3):
            for c in range(3):
                before = list(dp.router.routed)
                reply = await _generate(client, f"{c}-{turn}", history[c])
                placed[c].add(next(i for i in range(2) if dp.router.routed[i] != before[i]))
                history[c] += reply + [900 + turn] * 7  # the next user turn
        return placed

    placed = asyncio.run(_with_client(dp, body))
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    assert {r for replicas in placed.values() for r in replicas} == {0, 1}  # the first turns were spread
    stats = dp.stats()
    # Blocks of 16. Turn 2 (39 tokens) reuses turn 1's one full block with KV (20 prompt tokens and 11 of the 12
    # reply tokens: the last sampled one has none yet); turn 3 (58 tokens) reuses 48 (turn 2's 50 with KV).
    assert stats.prefix_cache_hits == 3 * (16 + 48)
    assert dp.router.decisions["affinity"] == 6


def test_a_killed_replica_fails_requests_in_flight_and_later_ones(checkpoints):
    dp = _dp_engine(checkpoints("glm45"), step_timeout=30.0)

    async def body(client):
        endless = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
        streams = [await client.add_request(str(i), [5 + i] * (3 + i), endless) for i in range(4)]
        assert sorted(dp.router.routed) == [2, 2]
        os.kill(dp._processes[0].pid, signal.SIGKILL)
        start = time.monotonic()
        for stream in streams:
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
        failed_after = time.monotonic() - start
        with pytest.raises(EngineDeadError):
            await client.add_request("late", [1, 2, 3], GREEDY)
        return failed_after

    processes = []
    original_start = dp.start

    def start():
        engine = original_start()
        processes.extend(engine._processes)
        return engine

    dp.start = start
    failed_after = asyncio.run(_with_client(dp, body))
    assert failed_after < 10
    assert all(not p.is_alive() for p in processes)  # the surviving replica was stopped too
