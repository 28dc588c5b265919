"""The server process from start to exit: load, serve, drain on SIGTERM, stop when the engine fails.

* SIGTERM or SIGINT drains: the listening socket closes at once (no new connection is accepted, idle keep-alive
  connections are closed), requests in flight run to their end for up to `--shutdown-timeout` seconds and are
  then ended with an error (a stream: an error event and [DONE]; glmserve.serving.drain), which aborts them in the
  engine; the process exits 0. A second SIGINT stops at once.
* If the engine fails (loading or stepping), every request in flight gets an OpenAI error at once (503, naming the
  kind of failure; the details go to the log), /health answers 503, and the server shuts down the same way and
  exits 1, as vLLM does, so that a supervisor restarts it. With GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH=1 (vLLM's
  VLLM_KEEP_ALIVE_ON_ENGINE_DEATH) it stays up instead, answering 503, for whoever wants to inspect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket

import uvicorn

from glmserve.engine.engine_client import AsyncEngineClient
from glmserve.serving.connections import (
    ThrottledLog,
    default_connection_limit,
    guarded_protocol,
    install_loop_error_log,
    raise_open_file_limit,
)
from glmserve.serving.drain import InFlight
from glmserve.serving.errors import APIError

logger = logging.getLogger("glmserve")

# After the grace period, how long the requests ended with an error have to write it before uvicorn cancels them.
END_IN_FLIGHT_S = 2.0
ENGINE_STOP_S = 5.0  # then, how long the engine has to finish its step and stop its ranks before they are killed


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, in_flight: InFlight, grace: float):
        super().__init__(config)
        self.in_flight, self.grace = in_flight, grace

    async def shutdown(self, sockets=None) -> None:
        end = asyncio.get_running_loop().call_later(self.grace, self._end_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            end.cancel()

    def _end_in_flight(self) -> None:
        error = APIError(503, f"The server is shutting down and the request did not finish within its grace period "
                              f"({self.grace:g} s).", code="server_shutting_down")
        ended = self.in_flight.end_all(error)
        if ended:
            logger.warning("shutdown grace period of %g s over: ended %d requests in flight with an error",
                           self.grace, ended)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version raises a caught SIGTERM again after its graceful shutdown, so the process would
        # end by the signal; a server that drained cleanly should exit 0.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def run_server(app, sock: socket.socket, client: AsyncEngineClient, names: list[str], *, log_level: str,
                     shutdown_timeout: float, in_flight: InFlight, request_read_timeout: float,
                     limit_concurrency: int | None = None, keep_alive_on_engine_death: bool = False) -> int:
    """Serve `app` on `sock` until a signal or an engine failure; the process's exit status. `limit_concurrency`
    caps open connections (default: what the open-file limit, raised to its maximum, leaves; connections.py)."""
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    open_files = raise_open_file_limit()
    log = ThrottledLog()
    install_loop_error_log(asyncio.get_running_loop(), log)
    protocol = guarded_protocol(limit_concurrency or default_connection_limit(open_files), request_read_timeout, log)
    server = _Server(uvicorn.Config(app, http=protocol, log_level=log_level, timeout_keep_alive=5,
                                    timeout_graceful_shutdown=shutdown_timeout + END_IN_FLIGHT_S),
                     in_flight, shutdown_timeout)
    client.start()
    try:
        return await _serve(server, sock, client, names, url, keep_alive_on_engine_death)
    finally:
        client.shutdown()
        await _stop_engine(client)


async def _stop_engine(client: AsyncEngineClient) -> None:
    """Wait for the engine thread to finish its step and stop its tensor-parallel ranks. A step that hangs on a
    stopped rank would last until --step-timeout: the ranks (this process's children) are killed instead, which
    fails the step at once."""
    if await asyncio.to_thread(client.join, ENGINE_STOP_S):
        return
    children = multiprocessing.active_children()
    if children:
        logger.warning("the engine did not stop within %g s: killing its %d tensor-parallel ranks", ENGINE_STOP_S,
                       len(children))
        for child in children:
            child.kill()
    await asyncio.to_thread(client.join, 60)  # one process: a step of its own, which ends


async def _serve(server: uvicorn.Server, sock: socket.socket, client: AsyncEngineClient, names: list[str], url: str,
                 keep_alive_on_engine_death: bool) -> int:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    logger.info("listening on %s; loading the model (/health answers 503 until it is ready)", url)
    ready = asyncio.ensure_future(client.wait_ready())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():  # stopped while loading
        ready.cancel()
        await serving
        return 0
    if ready.exception() is not None:
        logger.error("the model failed to load: %s", client.error)
        server.should_exit = True
        await serving
        return 1
    logger.info("ready: serving %s at %s/v1 (max_model_len %d)", ", ".join(names), url, ready.result().max_model_len)
    dead = asyncio.ensure_future(client.wait_dead())
    await asyncio.wait({serving, dead}, return_when=asyncio.FIRST_COMPLETED)
    if not dead.done():
        dead.cancel()
        return 0
    if keep_alive_on_engine_death:
        logger.error("the engine failed: %r; staying up (GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH), answering 503",
                     client.error)
        await serving
        return 1
    logger.error("the engine failed: %r; shutting down", client.error)
    server.should_exit = True
    await serving
    return 1
