"""Load with disconnects, backpressure, limits and deadlines, against real servers (RELIABILITY.md items 1-3)."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import metric, start_server

from glmserve.config import GenerationDefaults
from glmserve.engine.engine_client import AsyncEngineClient
from glmserve.engine.scheduler import SchedulerStats
from glmserve.serving.generation import stream_response
from glmserve.types import EngineOutput, SamplingParams

LOAD_SCRIPT = Path(__file__).parents[2] / "scripts" / "load_disconnects.py"
# With the limited server's >= 5 ms steps, at least 9.5 s of output on any machine: longer than any test's deadline.
ENDLESS = {"max_tokens": 1900, "ignore_eos": True}
USER = [{"role": "user", "content": "hi"}]


def test_load_with_disconnects(tmp_path):
    out = tmp_path / "load.json"
    # Paced steps: on a fast CPU, ~1 ms steps can outrun the event loop reading a probe's hang-up.
    done = subprocess.run([sys.executable, str(LOAD_SCRIPT), "--requests", "60", "--concurrency", "8", "--probes", "3",
                           "--step-delay-ms", "5", "--output", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    report = json.loads(out.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    # A string, which pytest prints whole (a tuple's repr is cut at 240 characters): a rare failure says what it was.
    why = json.dumps({"failed": failed, "failures": report.get("failures"),
                      "server_log_errors": report.get("server_log_errors"), "stderr": done.stderr[-2000:]}, indent=1)
    assert not failed and done.returncode == 0, why
    assert report["completed"] + report["abandoned"] == 60 and report["abandoned"] > 0
    assert report["after"] == {"running": 0, "waiting": 0, "kv_cache_usage": 0}
    assert report["server_exit_code"] == 0 and not report["server_log_errors"]


class _GatedEngine:
    """Emits one token per request per step; each step waits for the test to let it finish."""

    max_model_len = 100
    generation_defaults = GenerationDefaults()
    kv_spec = None  # no KV pool to report

    class model_config:  # noqa: N801 - mimics the attribute
        vocab_size = 1000

    def __init__(self):
        self.scheduler = self
        self.requests: set[str] = set()
        self.steps: list[set[str]] = []  # the requests each step ran
        self.in_step, self.release = threading.Event(), threading.Event()

    def stats(self):
        return SchedulerStats(len(self.requests), 0, 0.0, 0, 0)

    def add_request(self, request_id, prompt_token_ids, params):
        self.requests.add(request_id)

    def abort(self, request_ids):
        self.requests -= set(request_ids)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.steps.append(set(self.requests))
        self.in_step.set()
        self.release.wait()
        self.release.clear()
        return [EngineOutput(r, [7], False, None) for r in self.requests]


def test_an_abort_reaches_the_engine_before_its_next_step():
    engine = _GatedEngine()

    async def main():
        client = AsyncEngineClient(lambda: engine)
        client.start()
        await client.wait_ready()
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=1000))
        for _ in range(3):  # let two steps finish; the third is in progress when the client goes
            await asyncio.to_thread(engine.in_step.wait)
            engine.in_step.clear()
            engine.release.set()
        await asyncio.to_thread(engine.in_step.wait)
        stream.abort()
        await asyncio.sleep(0.05)  # the abort command is queued; the step in progress is still blocked
        engine.release.set()
        for _ in range(100):
            if not client.num_unfinished and not engine.requests:
                break
            await asyncio.sleep(0.01)
        client.shutdown()
        engine.release.set()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert [s for s in engine.steps if "a" in s] == [{"a"}] * 4 and not engine.requests


def test_stream_events_survive_naive_line_splitting():
    """The full-size load run found a stream event cut in two: the model wrote U+2028, which JSON leaves as is and
    httpx's iter_lines (like str.splitlines) takes for a line end. Such characters are escaped in SSE chunks."""

    class Finished:
        def close(self):
            pass

    async def chunks():
        yield "data: " + json.dumps({"text": "a\x85b\u2028c\u2029d"}, ensure_ascii=False) + "\n\n"

    async def main():
        return [chunk async for chunk in stream_response(Finished(), chunks(), None).body_iterator]

    lines = [line for line in "".join(asyncio.run(main())).splitlines() if line]
    assert lines == ['data: {"text": "a\\u0085b\\u2028c\\u2029d"}', "data: [DONE]"]
    assert json.loads(lines[0][6:])["text"] == "a\x85b\u2028c\u2029d"


@pytest.fixture(scope="module")
def limited(checkpoint, tmp_path_factory):
    flags = ["--max-num-seqs", "2", "--max-queued-requests", "2", "--request-timeout", "2", "--max-output-tokens",
             "1900", "--max-request-body-mb", "0.1", "--max-model-len", "2048", "--num-kv-blocks", "512",
             "--inject-step-delay-ms", "5"]
    server = start_server([str(checkpoint), *flags], tmp_path_factory.mktemp("limited") / "server.log")
    yield server
    server.stop()


def _wait_idle(http: httpx.Client) -> str:
    """/metrics once nothing runs (an abort reaches the engine's stats a step after the response ends)."""
    for _ in range(200):
        text = http.get("/metrics").text
        if metric(text, "glmserve:num_requests_running") == 0 == metric(text, "glmserve:num_requests_waiting"):
            return text
        time.sleep(0.01)
    raise AssertionError(f"still busy:\n{text}")


def _poll_metric(http: httpx.Client, name: str, expected: float, within_s: float = 1.0) -> float:
    """The metric once it reads `expected`, or its last reading after `within_s`."""
    deadline = time.monotonic() + within_s
    while (value := metric(http.get("/metrics").text, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_a_full_queue_answers_503_at_once_and_health_stays_fast(limited):
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        streams = []
        for _ in range(4):  # 2 running + 2 waiting: the whole capacity
            request = http.build_request("POST", "/v1/chat/completions",
                                         json={"messages": USER, "stream": True, **ENDLESS})
            streams.append(http.send(request, stream=True))
            assert streams[-1].status_code == 200
        try:
            for _ in range(3):
                start = time.monotonic()
                response = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
                assert time.monotonic() - start < 1.0
                error = _error(response, 503)
                assert error["type"] == "server_error" and error["code"] == "server_overloaded"
                assert response.headers["retry-after"] == "1"
            start = time.monotonic()
            assert http.get("/health").status_code == 200 and time.monotonic() - start < 0.5
            # The gauge is the engine's snapshot after its latest step, which may not have ended yet.
            assert _poll_metric(http, "glmserve:num_requests_waiting", 2) == 2
            # More sequences than the server ever takes is the client's error, whatever the load.
            assert _error(http.post("/v1/completions", json={"prompt": "a", "n": 5}), 400)["param"] == "n"
        finally:
            for stream in streams:
                stream.close()
        _wait_idle(http)
        assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_deadline_ends_requests_with_408(limited):
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        start = time.monotonic()
        error = _error(http.post("/v1/chat/completions", json={"messages": USER, **ENDLESS}), 408)
        assert error["code"] == "request_timeout" and 2 <= time.monotonic() - start < 5
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True, **ENDLESS}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert len(events) > 2 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert metric(_wait_idle(http), "glmserve:kv_cache_usage_perc") == 0


def test_size_limits_are_4xx(limited):
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 120_000}]}).encode()
        _error(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)
        chunked = iter([big[:60_000], big[60_000:]])  # no Content-Length: counted as it arrives
        _error(http.post("/v1/chat/completions", content=chunked, headers={"content-type": "application/json"}), 413)
        cases = [({"max_tokens": 1901}, "max_tokens"), ({"max_completion_tokens": 5000}, "max_completion_tokens"),
                 ({"n": 129}, "n"), ({"messages": USER * 2049}, "messages"), ({"stop": ["x"] * 65}, "stop"),
                 ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
                 ({"seed": 2**64}, "seed"), ({"temperature": float("nan")}, "temperature")]
        for body, param in cases:
            content = json.dumps({"messages": USER, **body}).encode()  # NaN is spelt NaN, as Python writes it
            response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
            assert _error(response, 400)["param"] == param, body
        assert http.get("/health").status_code == 200
