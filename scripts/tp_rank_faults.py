"""A --tensor-parallel-size 2 server under load loses a rank: stopped (SIGSTOP: hung) or killed (RELIABILITY.md
item 5).

For each fault, a fresh server on a small random GLM-4.5-Air-shaped checkpoint is loaded by CONCURRENCY clients
(chat requests, half streamed, looping) for a few seconds; then rank 1 gets the signal. Measured from the signal:
when the last request in flight ended (every one must end: an error event and [DONE] in a stream, a 503
otherwise, or a closed connection once the server has gone), when the process exited and with what status,
whether /health answered 200 after the engine failed, and whether any client saw gloo's internals (a source path,
the rendezvous address). Checks: every request ended within the fault's bound (--step-timeout + 5 s for a hung
rank, 5 s for a dead one), exit status 1 within 10 s more, the rank gone, no leak.

    python scripts/tp_rank_faults.py --output tp-faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

LEAKS = ("gloo", "127.0.0.1", ".cc", "/__w", "pytorch")


def start_tp_server(workdir: Path, step_timeout: float):
    from glmserve.serving.templates import glm45_chat_template
    from glmserve.testing.checkpoint import write_random_checkpoint
    from glmserve.testing.server import start_server

    checkpoint = workdir / "ckpt"
    if not checkpoint.exists():
        write_random_checkpoint(checkpoint, "air", chat_template=glm45_chat_template())
    flags = ["--tensor-parallel-size", "2", "--kv-cache-memory-gb", "0.1", "--max-model-len", "2048",
             "--step-timeout", str(step_timeout), "--served-model-name", "tp"]
    return start_server([str(checkpoint), *flags], workdir / f"server-{time.monotonic_ns()}.log", timeout=180)


def client(url: str, index: int, faulted: threading.Event, results: list, leaks: list) -> None:
    """Chat requests one after another; after the fault, how and when the one in flight ended."""
    body = {"model": "tp", "messages": [{"role": "user", "content": f"count {index}"}], "max_tokens": 64,
            "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=120) as http:
        while True:
            in_flight_at_fault = not faulted.is_set()
            try:
                if index % 2:
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                        text = "".join(line for line in response.iter_lines())
                        outcome = "error" if '"error"' in text else "ok" if response.status_code == 200 else "http"
                        outcome += f" {response.status_code}"
                else:
                    response = http.post("/v1/chat/completions", json=body)
                    text = response.text
                    outcome = f"{'ok' if response.status_code == 200 else 'http'} {response.status_code}"
                if any(leak in text for leak in LEAKS):
                    leaks.append(text[:300])
            except httpx.TransportError as e:
                outcome, text = f"closed {type(e).__name__}", ""
            if faulted.is_set():
                results.append((time.monotonic(), outcome, in_flight_at_fault))
                return


def run_fault(workdir: Path, fault: str, args) -> dict:
    server = start_tp_server(workdir, args.step_timeout)
    rank = int(re.search(r"ranks 1-1: pids (\d+)", server.output()).group(1))
    faulted, results, leaks, health = threading.Event(), [], [], []
    clients = [threading.Thread(target=client, args=(server.url, i, faulted, results, leaks))
               for i in range(args.concurrency)]
    try:
        for thread in clients:
            thread.start()
        time.sleep(args.load_seconds)
        os.kill(rank, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        at = time.monotonic()
        faulted.set()
        while server.process.poll() is None and time.monotonic() - at < args.step_timeout + 30:
            try:
                status = httpx.get(f"{server.url}/health", timeout=2).status_code
                health.append((round(time.monotonic() - at, 2), status))
            except httpx.TransportError:
                health.append((round(time.monotonic() - at, 2), None))
            time.sleep(0.1)
        exited = time.monotonic() - at if server.process.poll() is not None else None
        for thread in clients:
            thread.join(timeout=30)
    finally:
        server.stop()
        try:
            os.kill(rank, signal.SIGKILL)  # only if it is still there (it must not be)
            rank_gone = False
        except ProcessLookupError:
            rank_gone = True
    ends = [t - at for t, _, _ in results]
    outcomes: dict[str, int] = {}
    for _, outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    failed_at = next((t for t, status in health if status != 200), None)
    bound = args.step_timeout + 5 if fault == "stop" else 5.0
    report = {
        "fault": fault, "signal": "SIGSTOP" if fault == "stop" else "SIGKILL", "step_timeout_s": args.step_timeout,
        "requests_ended": len(results), "clients": args.concurrency, "outcomes": outcomes,
        "last_request_ended_s": round(max(ends, default=0), 2), "first_request_ended_s": round(min(ends, default=0), 2),
        "health_first_not_200_s": failed_at, "health_200_after_failure": sum(
            1 for t, status in health if status == 200 and failed_at is not None and t > failed_at),
        "exit_code": server.process.returncode, "exited_s": round(exited, 2) if exited is not None else None,
        "rank_gone": rank_gone, "leaks": leaks[:3],
    }
    report["checks"] = {
        "every_request_ended": len(results) == args.concurrency,
        "ended_within_bound": max(ends, default=0) < bound,
        "exit_1": report["exit_code"] == 1 and exited is not None and exited < bound + 10,
        "rank_gone": rank_gone, "no_leak": not leaks, "health_not_200_after_failure":
            report["health_200_after_failure"] == 0,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=5.0, help="load before the fault")
    p.add_argument("--step-timeout", type=float, default=10.0)
    p.add_argument("--faults", nargs="+", default=["stop", "kill"], choices=("stop", "kill"))
    p.add_argument("--output", help="also write the JSON report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        reports = [run_fault(Path(tmp), fault, args) for fault in args.faults]
    text = json.dumps(reports, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    failed = [f"{r['fault']}: {name}" for r in reports for name, ok in r["checks"].items() if not ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
