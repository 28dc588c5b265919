"""AsyncEngineClient with a fake engine: the thread hand-off, all-or-none adds, aborts, death, idling."""

import asyncio
import threading
import time

import pytest

from glmserve.config import GenerationDefaults
from glmserve.engine.engine_client import AsyncEngineClient, EngineDeadError, EngineRequest
from glmserve.engine.kv_planning import KVCacheSpec
from glmserve.engine.scheduler import SchedulerStats
from glmserve.types import EngineOutput, ParamError, SamplingParams


class FakeEngine:
    """Each request emits token 7 once per step until it has max_tokens of them. Records the threads it ran on."""

    max_model_len = 100
    generation_defaults = GenerationDefaults()
    kv_spec = KVCacheSpec("float32", 16, 8, 4096)

    class model_config:  # noqa: N801 - mimics the attribute
        vocab_size = 1000

    def __init__(self, fail_on_step: int | None = None):
        self.requests: dict[str, list[int]] = {}
        self.threads: set[int] = set()
        self.steps = 0
        self.aborted: list[str] = []
        self.fail_on_step = fail_on_step
        self.scheduler = self

    def stats(self):
        self.threads.add(threading.get_ident())
        return SchedulerStats(len(self.requests), 0, 0.5 if self.requests else 0.0, 0, 0)

    def add_request(self, request_id, prompt_token_ids, params):
        self.threads.add(threading.get_ident())
        if prompt_token_ids == [666]:
            raise ParamError("bad prompt", "prompt")
        self.requests[request_id] = [params.max_tokens, 0]

    def abort(self, request_ids):
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.threads.add(threading.get_ident())
        self.steps += 1
        if self.steps == self.fail_on_step:
            raise RuntimeError("boom")
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[1] += 1
            done = state[1] >= state[0]
            outputs.append(EngineOutput(request_id, [7], done, "length" if done else None))
            if done:
                del self.requests[request_id]
        time.sleep(0.002)
        return outputs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def started(engine):
    client = AsyncEngineClient(lambda: engine)
    client.start()
    await client.wait_ready()
    return client


def test_outputs_flow_from_the_engine_thread():
    engine = FakeEngine()

    async def main():
        client = await started(engine)
        stream = await client.add_requests([EngineRequest("a", [1], SamplingParams(max_tokens=3)),
                                            EngineRequest("b", [1], SamplingParams(max_tokens=5))])
        tokens = {"a": [], "b": []}
        async for out in stream:
            tokens[out.request_id] += out.new_token_ids
        client.shutdown()
        return tokens, client.stats

    tokens, stats = run(main())
    assert tokens == {"a": [7] * 3, "b": [7] * 5}
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_slow_consumer_gets_merged_outputs():
    async def main():
        client = await started(FakeEngine())
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=6))
        await asyncio.sleep(0.2)
        outs = [out async for out in stream]
        client.shutdown()
        return outs

    outs = run(main())
    assert len(outs) == 1 and outs[0].new_token_ids == [7] * 6 and outs[0].finished


def test_a_refused_request_takes_its_siblings_out():
    engine = FakeEngine()

    async def main():
        client = await started(engine)
        with pytest.raises(ParamError, match="bad prompt"):
            await client.add_requests([EngineRequest("ok", [1], SamplingParams(max_tokens=50)),
                                       EngineRequest("bad", [666], SamplingParams())])
        await asyncio.sleep(0.05)
        client.shutdown()

    run(main())
    assert engine.aborted == ["ok"] and not engine.requests


def test_abort_ends_the_stream_and_reaches_the_engine():
    engine = FakeEngine()

    async def main():
        client = await started(engine)
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=1000))
        first = await stream.__anext__()
        stream.abort()
        rest = [out async for out in stream]
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.01)
        client.shutdown()
        return first, rest

    first, rest = run(main())
    assert first.new_token_ids and rest == []
    assert engine.aborted == ["a"]


def test_engine_failure_fails_streams_and_later_adds():
    async def main():
        client = await started(FakeEngine(fail_on_step=2))
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=10))
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert client.error is not None and not client.ready
        with pytest.raises(EngineDeadError):
            await client.add_request("b", [1], SamplingParams())

    run(main())


def test_load_failure_is_reported_by_wait_ready():
    def factory():
        raise RuntimeError("no such checkpoint")

    async def main():
        client = AsyncEngineClient(factory)
        client.start()
        with pytest.raises(EngineDeadError, match="RuntimeError") as raised:  # the kind; details in the log
            await client.wait_ready()
        assert "no such checkpoint" not in str(raised.value) and "no such checkpoint" in str(client.error)

    run(main())


def test_idle_engine_thread_sleeps():
    engine = FakeEngine()

    async def main():
        client = await started(engine)
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=2))
        _ = [out async for out in stream]
        steps = engine.steps
        await asyncio.sleep(0.2)
        client.shutdown()
        return steps

    steps = run(main())
    assert engine.steps == steps == 2
