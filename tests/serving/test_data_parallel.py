"""`glmserve serve --data-parallel-size 2` as a user runs it, driven with the openai client and read from /metrics:
the requests spread over both replicas, a conversation's follow-ups land on the replica that holds its prefix (and
hit its cache), and a replica that is killed or hangs takes the server to a clean failure."""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from conftest import metric, run_glmserve, start_server
from test_faults import CHAT, PACED, _events, _gone, _kill

DP2 = ["--data-parallel-size", "2", "--num-kv-blocks", "128", "--max-model-len", "1024", "--served-model-name", "x"]
WORDS = ("river stone cloud paper lamp garden window music orange violet bridge candle forest winter copper "
         "harbor lemon pencil silver marble").split()


@pytest.fixture(scope="module")
def dp_server(checkpoint, tmp_path_factory):
    srv = start_server([str(checkpoint), *DP2], tmp_path_factory.mktemp("dp") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dp_client(dp_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key="none", max_retries=0, timeout=60)


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def _routed(server) -> list[float]:
    text = _metrics(server)
    return [metric(text, f'glmserve:dp_requests_total{{engine="{i}"}}') for i in range(2)]


def _sentence(seed: int, n: int = 24) -> str:
    return " ".join(WORDS[(seed * 7 + 3 * j + j * j) % len(WORDS)] for j in range(n))


def test_requests_spread_over_both_replicas(dp_server, dp_client):
    before = _routed(dp_server)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: dp_client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": f"{i}: {_sentence(i, 4)}"}], max_tokens=8), range(6)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    after = _routed(dp_server)
    spread = [a - b for a, b in zip(after, before)]
    assert sum(spread) == 6 and min(spread) >= 1, spread
    text = _metrics(dp_server)
    for i in range(2):  # each replica has stepped, and reports its own state
        assert metric(text, f'glmserve:dp_engine_steps_total{{engine="{i}"}}') > 0
        assert metric(text, f'glmserve:dp_num_requests_running{{engine="{i}"}}') == 0
    assert metric(text, "glmserve:num_requests_running") == 0


def test_follow_ups_land_on_the_replica_holding_their_prefix(dp_server, dp_client):
    """Three conversations of three turns each, one request at a time: every follow-up goes to its conversation's
    replica, and most of its prompt is found in that replica's prefix cache."""
    conversations = {c: [{"role": "user", "content": _sentence(10 + c)}] for c in range(3)}
    placed: dict[int, set[int]] = {c: set() for c in range(3)}
    hits = queries = 0
    for turn in range(3):
        for c, messages in conversations.items():
            text = _metrics(dp_server)
            before = [metric(text, f'glmserve:dp_requests_total{{engine="{i}"}}') for i in range(2)]
            before_cache = [metric(text, f"glmserve:prefix_cache_{k}_total") for k in ("hits", "queries")]
            reply = dp_client.chat.completions.create(model="x", messages=messages, max_tokens=8,
                                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            text = _metrics(dp_server)
            after = [metric(text, f'glmserve:dp_requests_total{{engine="{i}"}}') for i in range(2)]
            placed[c].add(next(i for i in range(2) if after[i] != before[i]))
            if turn:
                hits += metric(text, "glmserve:prefix_cache_hits_total") - before_cache[0]
                queries += metric(text, "glmserve:prefix_cache_queries_total") - before_cache[1]
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                         {"role": "user", "content": _sentence(20 + 3 * turn + c, 6)}]
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    assert {r for replicas in placed.values() for r in replicas} == {0, 1}  # new conversations were spread
    hit_rate = hits / queries
    print(f"follow-ups' prefix-cache hit rate: {hit_rate:.2f} ({hits:.0f} of {queries:.0f} prompt tokens)")
    assert hit_rate >= 0.6
    assert metric(_metrics(dp_server), 'glmserve:dp_router_decisions_total{reason="affinity"}') >= 6


def test_structured_output_is_held_on_every_replica(dp_server, dp_client):
    """Each replica matches the grammars of the requests it gets (random weights: a schema without free strings)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tone": {"enum": ["red", "green", "blue"]}}, "required": ["n", "tone"]}
    before = _routed(dp_server)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: dp_client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": _sentence(40 + i, 6)}], max_tokens=100, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}}), range(4)))
    assert min(a - b for a, b in zip(_routed(dp_server), before)) >= 1  # both replicas held some
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_sigterm_stops_the_replicas_and_exits_0(dp_server):
    pids = _replica_pids(dp_server)
    dp_server.process.send_signal(signal.SIGTERM)
    assert dp_server.process.wait(timeout=30) == 0
    assert all(_gone(pid) for pid in pids)


def test_start_up_errors(checkpoint, tmp_path):
    for flags, message in ((["--dp-size", "0"], "--data-parallel-size must be at least 1"),
                           (["--dp-size", str(os.cpu_count() + 1)], "cores are available"),
                           (["--dp-size", "2", "--enable-lora"], "--enable-lora with --data-parallel-size")):
        process = run_glmserve(["serve", str(checkpoint), *flags], tmp_path / "out.log")
        assert process.wait(timeout=60) == 2
        assert message in (tmp_path / "out.log").read_text()


def test_a_replica_that_fails_to_load_ends_the_server_with_1(checkpoint, tmp_path):
    process = run_glmserve(["serve", str(checkpoint), "--dp-size", "2", "--max-model-len", "100000",
                            "--host", "127.0.0.1", "--port", "0"], tmp_path / "out.log")
    assert process.wait(timeout=120) == 1
    log = (tmp_path / "out.log").read_text()
    assert "data-parallel replica" in log and "exceeds the model's max_position_embeddings" in log


def _replica_pids(server) -> list[int]:
    found = re.search(r"data parallel: 2 replicas \(pids (\d+), (\d+)\)", server.output())
    return [int(pid) for pid in found.groups()]


def _poll_health(server, statuses: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            statuses.append((time.monotonic(), httpx.get(f"{server.url}/health", timeout=2).status_code))
        except httpx.TransportError:
            statuses.append((time.monotonic(), None))
        stop.wait(0.05)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_failed_replica_fails_requests_in_flight_and_the_engine(checkpoint, tmp_path, fault):
    """SIGKILL of one replica, or SIGSTOP (found at --step-timeout): the streams in flight on both replicas end with
    an error event and the other replica is stopped. Killed: /health never answers 200 again and the server exits
    1. Hung, with GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH=1 so that it stays up to be asked: /health answers 503."""
    step_timeout = 3
    env = {"GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH": "1"} if fault == "hung" else None
    server = start_server([str(checkpoint), *DP2, "--step-timeout", str(step_timeout), *PACED],
                          tmp_path / "server.log", env=env)
    pids = _replica_pids(server)
    statuses, stop = [], threading.Event()
    poller = threading.Thread(target=_poll_health, args=(server, statuses, stop))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(_events, http, "/v1/chat/completions",
                                   {**CHAT, "messages": [{"role": "user", "content": _sentence(i)}]})
                       for i in range(4)]
            time.sleep(1.5)  # generating, two on each replica
            text = _metrics(server)
            assert [metric(text, f'glmserve:dp_num_requests_running{{engine="{i}"}}') for i in range(2)] == [2, 2]
            os.kill(pids[0], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
            failed_at = time.monotonic()
            poller.start()
            results = [s.result(timeout=60) for s in streams]
            ended_after = time.monotonic() - failed_at
            if fault == "hung":
                health = http.get("/health")
                assert health.status_code == 503 and "ReplicaFailedError" in health.json()["error"]["message"]
                assert http.post("/v1/completions", json={"prompt": "a"}).status_code == 503
        for events in results:
            assert events[-1] == "[DONE]", events[-3:]
            assert "engine has failed (ReplicaFailedError)" in json.loads(events[-2])["error"]["message"]
        assert ended_after < (2 if fault == "killed" else step_timeout + 3)
        if fault == "killed":
            assert server.process.wait(timeout=15) == 1
        else:
            time.sleep(0.5)  # the server stays up: a few more polls
        assert all(_gone(pid) for pid in pids)
        stop.set()
        poller.join()
        after = [status for at, status in statuses if at > failed_at + ended_after]
        assert after and all(status != 200 for status in after)
        cause = "holds requests and has sent nothing" if fault == "hung" else f"(pid {pids[0]}) exited with -9"
        assert cause in server.output()
    finally:
        stop.set()
        server.stop()
        for pid in pids:
            _kill(pid)
