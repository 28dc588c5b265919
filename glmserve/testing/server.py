"""A real `python -m glmserve serve` process on 127.0.0.1, for tests and evaluations that talk to it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_glmserve(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    # One intra-op thread unless `env` says otherwise: the server shares the cores with its client, and spinning
    # OpenMP threads on oversubscribed cores make a tiny model's steps tens of times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # A file, not a pipe: a pipe nobody drains would block the server once it fills.
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "glmserve", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def start_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 90.0) -> Server:
    """`glmserve serve ARGS` on a free port, returned once /health answers 200 (raises if it exits or times out)."""
    port = free_port()
    process = run_glmserve(["serve", *args, "--host", "127.0.0.1", "--port", str(port)], log, env)
    return wait_ready(Server(process, f"http://127.0.0.1:{port}", log), timeout, "glmserve serve")


def start_peer_server(command: list[str], port: int, log: Path, env: dict, timeout: float, name: str) -> Server:
    """Another engine's OpenAI server (`command` listens on 127.0.0.1:`port`), once its /health answers 200."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return wait_ready(Server(process, f"http://127.0.0.1:{port}", log), timeout, name)


def wait_ready(server: Server, timeout: float, name: str) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not become ready in {timeout}s:\n{server.output()}")
