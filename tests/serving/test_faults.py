"""An engine that raises, and SIGTERM, against real servers (RELIABILITY.md item 5; glmserve.serving.lifecycle)."""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import start_server

ENDLESS = {"max_tokens": 1900, "ignore_eos": True}  # with PACED, at least 9.5 s of output on any machine
PACED = ["--inject-step-delay-ms", "5"]  # a step takes >= 5 ms, so a long request stays long on a fast machine
CHAT = {"messages": [{"role": "user", "content": "hi"}], **ENDLESS}


def _events(http: httpx.Client, path: str, body: dict, first: threading.Event | None = None) -> list[str]:
    """A stream's `data:` payloads, read to its end (or to the connection's end); `first` is set at the first."""
    events = []
    try:
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if first is not None:
                        first.set()
    except httpx.RemoteProtocolError:  # the server closed the connection mid-stream
        events.append("<connection closed>")
    return events


def _wait_exit(server, timeout: float) -> int:
    server.process.wait(timeout=timeout)
    return server.process.returncode


def test_engine_failure_fails_requests_in_flight_and_exits_1(checkpoint, tmp_path):
    server = start_server([str(checkpoint), "--inject-fault-after-steps", "40"], tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
            start = time.monotonic()
            streamed = pool.submit(_events, http, "/v1/chat/completions", CHAT)
            whole = pool.submit(http.post, "/v1/chat/completions", json=CHAT)
            events, response = streamed.result(timeout=20), whole.result(timeout=20)
            elapsed = time.monotonic() - start
        assert events[-1] == "[DONE]"  # after the error event, as vLLM ends a stream
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "InjectedFault" in error["message"]
        assert response.status_code == 503 and "InjectedFault" in response.json()["error"]["message"]
        # The kind of failure only: the exception's own message (which can hold paths and addresses) stays in the log.
        assert "--inject-fault-after-steps" not in error["message"] + response.json()["error"]["message"]
        assert elapsed < 5  # 40 steps of two requests, then the error at once, not at some timeout
        assert _wait_exit(server, 15) == 1
        assert "the engine failed" in server.output() and "--inject-fault-after-steps" in server.output()
    finally:
        server.stop()


def test_keep_alive_on_engine_death(checkpoint, tmp_path):
    server = start_server([str(checkpoint), "--inject-fault-after-steps", "0"], tmp_path / "server.log",
                          env={"GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 503
            health = http.get("/health")
            assert health.status_code == 503 and "InjectedFault" in health.json()["error"]["message"]
            assert "--inject-fault-after-steps" not in health.text
            start = time.monotonic()
            assert http.post("/v1/completions", json={"prompt": "a"}).status_code == 503
            assert time.monotonic() - start < 1
        time.sleep(0.5)
        assert server.process.poll() is None
    finally:
        server.stop()


def test_sigterm_drains_then_exits_0(checkpoint, tmp_path):
    grace = 5
    server = start_server([str(checkpoint), "--shutdown-timeout", str(grace), *PACED], tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
            generating = threading.Event(), threading.Event()
            short = pool.submit(_events, http, "/v1/completions", {"prompt": "a", "max_tokens": 300,
                                                                      "ignore_eos": True}, generating[0])
            endless = pool.submit(_events, http, "/v1/completions", {"prompt": "b", **ENDLESS}, generating[1])
            # Both streaming before the signal (a fixed sleep let one arrive after it on a slow machine: a 503).
            assert all(started.wait(timeout=20) for started in generating)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
                httpx.get(f"{server.url}/health", timeout=2)
            short_events, endless_events = short.result(timeout=30), endless.result(timeout=30)
        assert short_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        # Cut at the end of the grace period: an error event, then [DONE]; one line in the log, no traceback.
        assert endless_events[-1] == "[DONE]", endless_events[-3:]
        assert json.loads(endless_events[-2])["error"]["code"] == "server_shutting_down"
        assert _wait_exit(server, 10) == 0
        assert grace <= time.monotonic() - signalled < grace + 5
        log = server.output()
        assert "Traceback" not in log and log.count("grace period") == 1, log
    finally:
        server.stop()


TP2 = ["--tensor-parallel-size", "2", "--kv-cache-memory-gb", "0.05"]
LEAKS = ("gloo", "127.0.0.1", ".cc", "/__w", "pytorch")  # what gloo's error messages hold


def _rank_pid(server) -> int:
    """Rank 1's pid, from the log line the engine writes when it has started its ranks."""
    return int(re.search(r"parallel: tp 2 x pp 1 .*\(ranks 1-1: pids (\d+)\)", server.output()).group(1))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _kill(pid: int) -> None:
    """Whatever the test's outcome, leave no stopped rank behind."""
    if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_hung_tensor_parallel_rank_fails_the_engine_at_the_step_timeout(checkpoint, tmp_path):
    """A stopped rank (kill -STOP) used to hang the server for gloo's 10 minutes with /health 200. Now the step
    fails at --step-timeout as a dead rank's does: the stream gets an error (no gloo internals in it), /health
    stops answering 200, the stopped rank is killed and the process exits 1."""
    step_timeout = 3
    server = start_server([str(checkpoint), *TP2, "--step-timeout", str(step_timeout), *PACED],
                          tmp_path / "server.log")
    statuses, stop = [], threading.Event()

    def poll_health():
        while not stop.is_set():
            try:
                statuses.append((time.monotonic(), httpx.get(f"{server.url}/health", timeout=2).status_code))
            except httpx.TransportError:
                statuses.append((time.monotonic(), None))
            stop.wait(0.1)

    poller = threading.Thread(target=poll_health)
    rank = _rank_pid(server)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(_events, http, "/v1/chat/completions", CHAT)
            time.sleep(1)  # generating
            os.kill(rank, signal.SIGSTOP)
            stopped = time.monotonic()
            poller.start()
            events = streamed.result(timeout=60)
            failed_after = time.monotonic() - stopped
        assert events[-1] == "[DONE]", events[-3:]
        message = json.loads(events[-2])["error"]["message"]
        assert "engine has failed" in message and not any(leak in message for leak in LEAKS), message
        assert step_timeout - 0.5 <= failed_after < step_timeout + 5
        assert _wait_exit(server, 15) == 1
        exited_after = time.monotonic() - stopped
        assert _gone(rank) and exited_after < step_timeout + 10
        stop.set()
        poller.join()
        assert all(status != 200 for at, status in statuses if at > stopped + failed_after)
        assert "Timed out" in server.output()  # the details are in the log
    finally:
        stop.set()
        server.stop()
        _kill(rank)


def test_sigterm_ends_a_server_whose_rank_is_hung(checkpoint, tmp_path):
    """SIGTERM did not end a server with a stopped rank (its step never ended). Now the stream is ended at the grace
    period, and the engine's ranks are killed a few seconds after: the process ends within --shutdown-timeout + 10 s,
    long before the step timeout (60 s here)."""
    grace = 2
    server = start_server([str(checkpoint), *TP2, "--step-timeout", "60", "--shutdown-timeout", str(grace), *PACED],
                          tmp_path / "server.log")
    rank = _rank_pid(server)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(_events, http, "/v1/chat/completions", CHAT)
            time.sleep(1)
            os.kill(rank, signal.SIGSTOP)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            events = streamed.result(timeout=60)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        server.process.wait(timeout=30)
        assert time.monotonic() - signalled < grace + 10
        assert _gone(rank)
    finally:
        server.stop()
        _kill(rank)
