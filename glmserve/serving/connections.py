"""The server's TCP connections: what uvicorn's HTTP/1.1 protocol leaves to a proxy in front of it.

* TCP_NODELAY on every accepted connection. asyncio sets it only on sockets whose `proto` is IPPROTO_TCP, and a
  socket from `socket.create_server` (ours) has proto 0: without it, Nagle's algorithm held each response's second
  write until the client's delayed ACK, ~40 ms on every reused connection.
* `--limit-concurrency`: at most this many open connections; one beyond gets a 503 and is closed at once, before
  it can hold a file descriptor for long. The default keeps the server under its open-file limit
  (`default_connection_limit`; asyncio accepts up to uvicorn's backlog of connections in one go before any is
  refused), so that accept() does not fail with EMFILE.
* `--request-read-timeout`: a request's headers and body must arrive within this many seconds of its first byte
  (of the connection's start, for the first request); else 408 (when nothing has been answered yet) and the
  connection is closed. uvicorn itself only times out idle keep-alive connections, so a client that never
  finished its headers held its connection, and a file descriptor, forever.
* Repeated errors (asyncio's accept() failures, the connections refused or timed out) are logged once per
  `LOG_INTERVAL_S` with a count, not once per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("glmserve")

LOG_INTERVAL_S = 10.0
# File descriptors kept for everything but client connections: the model's files, the TP ranks' sockets, logs.
RESERVED_FDS = 256
ACCEPT_BURST = 2048  # uvicorn's backlog: how many connections asyncio accepts in one pass
MIN_CONNECTIONS = 16
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def raise_open_file_limit(target: int = 65535) -> int:
    """Raise the soft limit on open files towards `target`, within the hard limit, as vLLM's server does; the soft
    limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_connection_limit(open_file_limit: int) -> int:
    return max(MIN_CONNECTIONS, open_file_limit - RESERVED_FDS - ACCEPT_BURST)


class ThrottledLog:
    """Log a repeated event once per interval: the first at once, then a count of those since."""

    def __init__(self, interval: float = LOG_INTERVAL_S):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def log(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._since[key] = self._since.get(key, 0) + 1
            return
        repeats = self._since.pop(key, 0)
        self._last[key] = now
        suffix = f" (and {repeats} more like it in the last {self.interval:g} s)" if repeats else ""
        logger.warning(message + suffix, *args)


def install_loop_error_log(loop: asyncio.AbstractEventLoop, log: ThrottledLog) -> None:
    """asyncio's accept() loop reports EMFILE once per pending connection, with a traceback each; one line per
    interval says the same."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "accept" in context.get("message", ""):
            log.log("accept", "%s: %s", context["message"], context.get("exception"))
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def guarded_protocol(max_connections: int, read_timeout: float, log: ThrottledLog) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with TCP_NODELAY, the connection cap and the request read deadline."""

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.server_state.connections) >= max_connections:
                self._refused = True
                log.log("refused", "%d connections open (--limit-concurrency): refusing more with 503",
                            max_connections)
                transport.write(_REFUSED)
                transport.close()
                return
            super().connection_made(transport)
            self._track_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._stop_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track_reading()

        def _track_reading(self) -> None:
            """A deadline runs while a request is partly read: headers unfinished, or the body still coming."""
            reading = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
            if reading and self._read_deadline is None:
                self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)
            elif not reading:
                self._stop_deadline()

        def _stop_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY) or self.transport.is_closing():
                return
            log.log("read timeout", "closed a connection that did not send its request within %g s "
                                        "(--request-read-timeout)", read_timeout)
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing answered yet
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    return GuardedH11Protocol
