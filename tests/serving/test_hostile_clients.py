"""What an attacker's client does to a real server (RELIABILITY.md item 7): huge prompts beside a running stream,
deeply nested JSON, connections that never finish their request, and the latency of a reused connection."""

import itertools
import json
import socket
import statistics
import threading
import time

import httpx
import pytest
from conftest import start_server

KEY = "sk-hostile-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 3  # --request-read-timeout of the server below
CONNECTION_CAP = 400  # --limit-concurrency of the server below
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def hostile(checkpoint, tmp_path_factory):
    flags = ["--api-key", KEY, "--max-model-len", "2048", "--num-kv-blocks", "512", "--inject-step-delay-ms", "5",
             "--request-read-timeout", str(READ_TIMEOUT), "--limit-concurrency", str(CONNECTION_CAP)]
    server = start_server([str(checkpoint), *flags], tmp_path_factory.mktemp("hostile") / "server.log")
    try:
        yield server
        assert server.process.poll() is None, server.output()
        assert "Traceback" not in server.output(), server.output()[-3000:]
    finally:
        server.stop()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _request(sock: socket.socket, method: str, path: str, body: dict | str | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 exchange on an open (keep-alive) connection (body: an object, or JSON text): status, headers,
    body."""
    payload = b"" if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock.sendall(head.encode() + payload)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server mid-body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def _nested(depth: int) -> str:
    """JSON text of arrays and objects `depth` levels deep (json.dumps itself would hit the recursion limit)."""
    opens = "".join('{"k":' if level % 2 else "[" for level in range(depth))
    closes = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return opens + '"leaf"' + closes


@pytest.mark.parametrize("depth", [100, 600, 950, 10_000])
def test_deeply_nested_json_is_a_4xx_and_the_connection_survives(hostile, depth):
    """JSON 500-950 levels deep was a RecursionError (500, connection reset) in the template's argument walks."""
    nested, user = _nested(depth), json.dumps(USER)

    def body(template: str) -> str:  # JSON text with the nested value where NESTED stands
        return template.replace("USER", user).replace("NESTED", nested)

    tool = '{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": NESTED}}}'
    cases = [("/v1/chat/completions", body('{"messages": USER, "chat_template_kwargs": {"x": NESTED}}')),
             ("/v1/chat/completions", body('{"messages": USER, "tools": [' + tool + "]}")),
             ("/v1/chat/completions", body('{"messages": [{"role": "user", "content": "hi", "extra": NESTED}]}')),
             ("/tokenize", body('{"messages": USER, "chat_template_kwargs": {"x": NESTED}}')),
             ("/tokenize", body('{"messages": [{"role": "tool", "content": "hi", "extra": NESTED}]}'))]
    sock = _connect(hostile.url)
    try:
        for path, body in cases:
            status, headers, payload = _request(sock, "POST", path, body)
            assert 400 <= status < 500 and json.loads(payload)["error"]["message"], (path, status, payload)
            assert headers.get("connection") != "close"
        status, _, _ = _request(sock, "GET", "/health")  # the same connection, still open
        assert status == 200
    finally:
        sock.close()


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (perhaps after an answer: 408, 503, or 401 when a
    request that needs the key stopped in its body)."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_stalled_connections_are_closed_while_normal_requests_are_served(hostile):
    """20,400 connections that never finished their headers used to exhaust the server's file descriptors; now each
    is closed --request-read-timeout after it opened, and beyond --limit-concurrency open connections get 503."""
    stalled = []
    try:
        for i in range(300):  # headers never finished, or a body that stops short
            sock = _connect(hostile.url)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 3 else
                         b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
            stalled.append(sock)
        with httpx.Client(base_url=hostile.url, headers=AUTH, timeout=30) as http:
            response = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
            assert response.status_code == 200
            stalled[-1].setblocking(False)
            with pytest.raises(BlockingIOError):  # served while the stalled connections are still open
                stalled[-1].recv(1)
            beyond = [_connect(hostile.url) for _ in range(CONNECTION_CAP - len(stalled) + 20)]
            stalled += beyond
            for sock in beyond[-10:]:  # the last ones are over the cap: refused at once
                sock.settimeout(1)
                assert sock.recv(4096).startswith(b"HTTP/1.1 503")
            deadline = time.monotonic() + READ_TIMEOUT + 3  # the first were opened earlier still
            open_ = [i for i, sock in enumerate(stalled) if not _closed_by_server(sock, deadline)]
            assert not open_, (open_, len(stalled))
            assert time.monotonic() < deadline
            assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
    log = hostile.output()
    assert log.count("--request-read-timeout") <= 2 and log.count("--limit-concurrency") <= 2, log[-2000:]


def test_accept_errors_are_logged_once_per_interval(checkpoint, tmp_path):
    """Out of file descriptors, asyncio logged a traceback per pending connection (286,719 in 40 s)."""
    import resource

    server = start_server([str(checkpoint), "--limit-concurrency", "1000", "--request-read-timeout", "1"],
                          tmp_path / "server.log")
    resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (64, 64))  # far fewer than the connections
    socks = []
    try:
        for _ in range(200):
            socks.append(_connect(server.url))
            socks[-1].sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(3)  # past the read timeout: the server has file descriptors again
        for sock in socks:
            sock.close()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        output = server.output()
        assert 1 <= output.count("out of system resource") <= 2 and "Traceback" not in output, output[-3000:]
    finally:
        server.stop()


def test_a_reused_connection_is_as_fast_as_a_fresh_one(hostile):
    """Without TCP_NODELAY every response on a reused connection waited ~40 ms for the client's delayed ACK."""

    def timed(sock: socket.socket) -> float:
        start = time.monotonic()
        status, _, _ = _request(sock, "GET", "/v1/models")
        assert status == 200
        return time.monotonic() - start

    fresh = []
    for _ in range(15):
        with _connect(hostile.url) as sock:
            fresh.append(timed(sock))
    with _connect(hostile.url) as sock:
        reused = [timed(sock) for _ in range(15)]
    assert statistics.median(reused) < statistics.median(fresh) + 0.015, (fresh, reused)


STALL_BOUND_S = 1.5  # the largest gap a stream or /health may see while the huge prompts are handled


def test_a_huge_prompt_stalls_neither_a_stream_nor_health(hostile):
    """A 15 MB prompt used to hold the event loop for 23-30 s: template and tokenizer ran on it. Now the length in
    characters refuses it before tokenizing, a long prompt that passes is tokenized in a worker thread, and a
    running stream and /health keep going meanwhile."""
    huge = "x " * (15 * 2**20 // 2)
    user = [{"role": "user", "content": huge}]
    bodies = [("/tokenize", {"prompt": huge}), ("/v1/chat/completions", {"messages": user}),
              ("/v1/completions", {"prompt": huge}), ("/tokenize", {"messages": user}),
              # under the length bound (2,048 tokens x 27 characters) but ~10,000 tokens: tokenized, then refused
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 10_000}]})]
    encoded = [(path, json.dumps(body).encode()) for path, body in bodies]  # before the clocks start
    arrivals, health, stop = [], [], threading.Event()

    def stream():
        with httpx.Client(base_url=hostile.url, headers=AUTH, timeout=30) as http:
            body = {"prompt": "a", "max_tokens": 1900, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    arrivals.append(time.monotonic())
                    if stop.is_set():
                        return

    def poll_health():
        with httpx.Client(base_url=hostile.url, timeout=30) as http:
            while not stop.is_set():
                start = time.monotonic()
                assert http.get("/health").status_code == 200
                health.append(time.monotonic() - start)
                stop.wait(0.05)

    threads = [threading.Thread(target=stream), threading.Thread(target=poll_health)]
    for thread in threads:
        thread.start()
    try:
        while len(arrivals) < 5:
            time.sleep(0.01)
        with httpx.Client(base_url=hostile.url, headers={**AUTH, "content-type": "application/json"},
                          timeout=60) as http:
            assert http.post("/tokenize", content=encoded[0][1], headers={"authorization": ""}).status_code == 401
            began = time.monotonic()
            for path, content in encoded:
                response = http.post(path, content=content)
                assert response.status_code == 400, (path, response.text[:300])
                assert "context" in response.json()["error"]["message"], response.text[:300]
            took = time.monotonic() - began
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    window = [b - a for a, b in itertools.pairwise(arrivals) if b >= began]
    assert window and health, (len(arrivals), len(health))
    assert max(window) < STALL_BOUND_S and max(health) < STALL_BOUND_S, (max(window), max(health), took)
