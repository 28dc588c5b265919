"""What an attacker's client does to a real server (RELIABILITY.md item 7): huge prompts beside a running stream,
deeply nested JSON, connections that never finish their request, and the latency of a reused connection."""

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
READ_TIMEOUT = 2  # --request-read-timeout of the server below
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
    tool = '{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": %s}}}'
    cases = [("/v1/chat/completions", '{"messages": %s, "chat_template_kwargs": {"x": %s}}' % (user, nested)),
             ("/v1/chat/completions", '{"messages": %s, "tools": [%s]}' % (user, tool % nested)),
             ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "extra": %s}]}' % nested),
             ("/tokenize", '{"messages": %s, "chat_template_kwargs": {"x": %s}}' % (user, nested)),
             ("/tokenize", '{"messages": [{"role": "tool", "content": "hi", "extra": %s}]}' % nested)]
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
