"""Load with disconnects against a real `glmserve serve` on 127.0.0.1 (RELIABILITY.md, item 1).

REQUESTS chat requests from CONCURRENCY clients: half streamed, prompts of 1 to 400 words, max_tokens from 1 to
96, a quarter with tools, a quarter with thinking off, a quarter with scripted reasoning; a fraction of them hang
up at a random point (mid-stream after a random number of chunks, or a random delay into a non-streamed one). Then:

* every request that was not abandoned got a well-formed response: a chat.completion whose usage adds up and whose
  tool calls parse, or a stream of chunks with one finish_reason, no error event, the usage chunk and [DONE];
* /metrics shows nothing running or waiting and an empty KV cache (the aborts are counted too, but a hang-up
  after the engine finished a request, or before it reached the engine, has nothing to abort);
* the server's RSS (process_resident_memory_bytes) is back within a margin of its level after a warm-up round;
* /health, polled through the run, always answered 200 (latencies reported);
* abort probe: a lone endless stream is dropped PROBES times; the engine steps it still takes part in after the
  hang-up are counted from /metrics (glmserve:engine_steps): at most two (see `abort_probe`).

Beside the load, optionally (RELIABILITY.md item 7): --huge-prompt-mb sends chat prompts of that size one after
another (each must be refused with 400, the stream gaps and /health above stay the measure of harm), and
--stalled-connections keeps that many connections open that never finish their headers (each reopened when the
server closes it at its --request-read-timeout).

Without --url it starts its own server on a small random GLM-4.5-Air-shaped checkpoint with scripted outputs for
the tool and reasoning requests, and stops it at the end. Prints a JSON report (and writes it to --output); exits 1
if a check failed. Bounded: at most --time-limit seconds.

    python scripts/load_disconnects.py --requests 2000 --concurrency 64 --output load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
# What the scripted model says to a prompt holding the marker (glmserve.testing.scripted).
SCRIPT = {
    "LOAD_TOOL": "\n<think>The user wants the weather.</think>\n<tool_call>get_weather\n<arg_key>location</arg_key>\n"
                 "<arg_value>Paris</arg_value>\n</tool_call><|observation|>",
    "LOAD_THINK": "\n<think>Let me think about it step by step.</think>\nHere is my answer.<|user|>",
}
WORDS = "the quick brown fox jumps over a lazy dog while models predict next tokens given previous ones".split()
FINISH_REASONS = {"stop", "length", "tool_calls"}


@dataclass
class Spec:
    index: int
    stream: bool
    kind: str  # plain | nothink | think | tools
    words: int
    max_tokens: int
    hang_up_after: int | float | None  # chunks (stream) or seconds (not streamed); None: read to the end

    def body(self, model: str) -> dict:
        text = " ".join(WORDS[(self.index + i) % len(WORDS)] for i in range(self.words))
        marker = {"think": "LOAD_THINK ", "tools": "LOAD_TOOL "}.get(self.kind, "")
        body = {"model": model, "messages": [{"role": "user", "content": marker + text}],
                "max_tokens": self.max_tokens, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.kind == "tools":
            body["tools"] = [WEATHER_TOOL]
        if self.kind == "nothink":
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return body


def make_specs(n: int, hang_up_fraction: float, seed: int, start: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(start, start + n):
        stream = rng.random() < 0.5
        kind = rng.choice(["plain", "nothink", "think", "tools"])
        scripted = kind in ("think", "tools")
        hang_up = None
        if rng.random() < hang_up_fraction:
            hang_up = rng.randint(0, 12) if stream else rng.uniform(0.0, 0.3)
        specs.append(Spec(i, stream, kind, rng.randint(1, 400), 128 if scripted else rng.randint(1, 96), hang_up))
    return specs


@dataclass
class Tally:
    completed: int = 0
    abandoned: int = 0
    finished_before_hang_up: int = 0  # not-streamed requests that answered before their hang-up time
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def check_completion(spec: Spec, data: dict) -> str | None:
    """What is wrong with a non-streamed response, or None."""
    if data.get("object") != "chat.completion" or len(data.get("choices", ())) != 1:
        return f"not one chat.completion choice: {str(data)[:200]}"
    choice, usage = data["choices"][0], data["usage"]
    if choice["finish_reason"] not in FINISH_REASONS:
        return f"finish_reason {choice['finish_reason']!r}"
    if usage["prompt_tokens"] + usage["completion_tokens"] != usage["total_tokens"]:
        return f"usage does not add up: {usage}"
    if usage["completion_tokens"] > spec.max_tokens:
        return f"{usage['completion_tokens']} tokens for max_tokens {spec.max_tokens}"
    message = choice["message"]
    if message["role"] != "assistant" or not isinstance(message["content"], (str, type(None))):
        return f"bad message: {message}"
    for call in message.get("tool_calls") or ():
        json.loads(call["function"]["arguments"])
    if spec.kind == "tools" and choice["finish_reason"] == "tool_calls":
        if [c["function"]["name"] for c in message["tool_calls"]] != ["get_weather"]:
            return f"tool calls {message['tool_calls']}"
    return None


def check_stream(spec: Spec, events: list[str]) -> str | None:
    """What is wrong with a whole SSE stream (its `data:` payloads), or None."""
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {[c for c in chunks if 'error' in c][0]}"
    reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    if len(reasons) != 1 or reasons[0] not in FINISH_REASONS:
        return f"finish reasons {reasons}"
    usage = chunks[-1].get("usage")
    if chunks[-1]["choices"] or not usage or usage["completion_tokens"] > spec.max_tokens:
        return f"bad usage chunk: {chunks[-1]}"
    calls = {}
    for c in chunks:
        for ch in c["choices"]:
            for call in ch["delta"].get("tool_calls") or ():
                entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                function = call.get("function") or {}
                entry["name"] += function.get("name") or ""
                entry["arguments"] += function.get("arguments") or ""
    for call in calls.values():
        json.loads(call["arguments"])
    if spec.kind == "tools" and reasons[0] == "tool_calls" and [c["name"] for c in calls.values()] != ["get_weather"]:
        return f"tool calls {calls}"
    return None


async def run_one(http: httpx.AsyncClient, spec: Spec, model: str, tally: Tally) -> None:
    start = time.monotonic()
    body = spec.body(model)
    try:
        if spec.stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    tally.failures.append(f"#{spec.index}: HTTP {response.status_code} {response.text[:200]}")
                    return
                events = []
                # aiter_lines splits like str.splitlines, at U+2028 too: the server escapes such characters.
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if spec.hang_up_after is not None and len(events) > spec.hang_up_after:
                            tally.abandoned += 1  # leaving the block closes the connection mid-stream
                            return
            problem = check_stream(spec, events)
        else:
            call = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            if spec.hang_up_after is not None:
                done, _ = await asyncio.wait({call}, timeout=spec.hang_up_after)
                if not done:
                    call.cancel()  # httpx drops the connection: the server sees the client go
                    tally.abandoned += 1
                    return
                tally.finished_before_hang_up += 1
            response = await call
            if response.status_code != 200:
                tally.failures.append(f"#{spec.index}: HTTP {response.status_code} {response.text[:200]}")
                return
            problem = check_completion(spec, response.json())
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        tally.failures.append(f"#{spec.index} ({'stream' if spec.stream else 'json'}, {spec.kind}): {problem}")
    else:
        tally.completed += 1
        tally.latencies.append(time.monotonic() - start)


async def run_load(http: httpx.AsyncClient, specs: list[Spec], model: str, concurrency: int) -> Tally:
    tally, queue = Tally(), list(reversed(specs))

    async def client() -> None:
        while queue:
            await run_one(http, queue.pop(), model, tally)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tally


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (over all labels) in Prometheus text; 0 if it has none."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def scrape(http: httpx.AsyncClient) -> str:
    return (await http.get("/metrics")).text


async def wait_idle(http: httpx.AsyncClient, timeout: float = 30.0) -> tuple[str, float]:
    """/metrics once nothing is running or waiting (or at the timeout), and the seconds that took."""
    start = time.monotonic()
    while True:
        text = await scrape(http)
        idle = metric(text, "glmserve:num_requests_running") == 0 == metric(text, "glmserve:num_requests_waiting")
        if idle or time.monotonic() - start > timeout:
            return text, time.monotonic() - start
        await asyncio.sleep(0.01)


def poll_health(url: str, stop: threading.Event, latencies: list[float], codes: list[int]) -> None:
    """In a thread of its own, so that a busy load client does not count against the server."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            start = time.monotonic()
            codes.append(http.get("/health").status_code)
            latencies.append(time.monotonic() - start)
            stop.wait(0.05)


def send_huge_prompts(url: str, headers: dict, megabytes: float, stop: threading.Event, report: dict) -> None:
    """One huge chat prompt after another until `stop`, in a thread of its own; statuses and latencies."""
    words = "many words " * int(megabytes * 2**20 / 11)
    body = json.dumps({"model": "load", "messages": [{"role": "user", "content": words}], "max_tokens": 1}).encode()
    statuses, latencies = report.setdefault("statuses", {}), report.setdefault("latencies", [])
    with httpx.Client(base_url=url, headers={**headers, "content-type": "application/json"}, timeout=120) as http:
        while not stop.is_set():
            start = time.monotonic()
            status = str(http.post("/v1/chat/completions", content=body).status_code)
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(time.monotonic() - start)


def hold_stalled_connections(url: str, count: int, stop: threading.Event, report: dict) -> None:
    """Keep `count` connections open that never finish their headers, reopening each the server closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def open_one() -> socket.socket:
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        return sock

    socks = [open_one() for _ in range(count)]
    report.update(opened=count, closed_by_server=0)
    while not stop.wait(0.5):
        for i, sock in enumerate(socks):
            try:
                if sock.recv(4096):
                    continue  # the 408 first; its end comes next
            except BlockingIOError:
                continue
            except OSError:
                pass
            sock.close()
            report["closed_by_server"] += 1
            socks[i] = open_one()
            report["opened"] += 1
    for sock in socks:
        sock.close()


def start_beside(args, url: str, headers: dict) -> tuple[threading.Event, list[threading.Thread], dict]:
    """The huge prompts and stalled connections asked for, each in a thread of its own until the event is set."""
    stop, beside, threads = threading.Event(), {"huge_prompts": {}, "stalled_connections": {}}, []
    if args.huge_prompt_mb:
        threads.append(threading.Thread(target=send_huge_prompts, args=(url, headers, args.huge_prompt_mb, stop,
                                                                        beside["huge_prompts"])))
    if args.stalled_connections:
        threads.append(threading.Thread(target=hold_stalled_connections, args=(
            url, args.stalled_connections, stop, beside["stalled_connections"])))
    for thread in threads:
        thread.start()
    return stop, threads, beside


async def abort_probe(http: httpx.AsyncClient, model: str) -> dict:
    """Drop a lone endless stream after a few chunks; count the engine steps it still took part in.

    `steps_after_hang_up`: steps run after a scrape made right after the hang-up; `steps_upper_bound`: counted from
    a scrape made just before it. The engine applies an abort before its next step (tests/serving/test_reliability
    shows it in-process); from outside, one more step can pass while the server's event loop, which shares the GIL
    with the engine thread, reads the hang-up: so at most 2."""
    body = {"model": model, "messages": [{"role": "user", "content": "count to a million"}], "stream": True,
            "max_tokens": 1500, "ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks == 4:
                before = metric(await scrape(http), "glmserve:engine_steps_total")
                break  # leaving the block hangs up
    hung_up = time.monotonic()
    after = metric(await scrape(http), "glmserve:engine_steps_total")
    text, _ = await wait_idle(http)
    end = metric(text, "glmserve:engine_steps_total")
    return {"steps_after_hang_up": end - after, "steps_upper_bound": end - before,
            "seconds_to_leave_batch": round(time.monotonic() - hung_up, 4)}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


async def run(args, url: str, model: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Idle connections are dropped after 4 s, before the server's keep-alive timeout (5 s) closes them: at equal
    # timeouts a request sent on a connection just as the server closes it is lost (seen once in 2,000).
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8,
                          keepalive_expiry=4.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:
        # Warm-up: the same mix (huge prompts and stalled connections included), and the probe's long sequence,
        # so that the baseline has seen every shape and the allocator's high-water mark.
        stop_beside, beside_threads, _ = start_beside(args, url, headers)
        warmup = await run_load(http, make_specs(args.warmup, 0.0, args.seed + 1), model, args.concurrency)
        stop_beside.set()
        for thread in beside_threads:
            thread.join()
        await abort_probe(http, model)
        rss_warm = metric((await wait_idle(http))[0], "process_resident_memory_bytes")
        aborts_before = metric(await scrape(http), 'glmserve:request_success_total{finished_reason="abort"}')

        stop, threads, beside = start_beside(args, url, headers)
        health_latencies, health_codes = [], []
        threads.append(threading.Thread(target=poll_health, args=(url, stop, health_latencies, health_codes)))
        threads[-1].start()
        start = time.monotonic()
        specs = make_specs(args.requests, args.hang_up_fraction, args.seed)
        tally = await run_load(http, specs, model, args.concurrency)
        elapsed = time.monotonic() - start
        stop.set()
        for thread in threads:
            thread.join()
        text, idle_after = await wait_idle(http)
        probes = [await abort_probe(http, model) for _ in range(args.probes)]
        final = await scrape(http)

    aborts = metric(final, 'glmserve:request_success_total{finished_reason="abort"}') - aborts_before
    rss_end = metric(final, "process_resident_memory_bytes")
    report = {
        "requests": args.requests, "concurrency": args.concurrency, "hang_up_fraction": args.hang_up_fraction,
        "seconds": round(elapsed, 1), "requests_per_s": round(args.requests / elapsed, 1),
        "completed": tally.completed, "abandoned": tally.abandoned,
        "finished_before_hang_up": tally.finished_before_hang_up,
        "failures": ([f"warm-up {f}" for f in warmup.failures] + tally.failures)[:20],
        "num_failures": len(tally.failures) + len(warmup.failures),
        "latency_s": {"p50": round(percentile(tally.latencies, 50), 3),
                      "p99": round(percentile(tally.latencies, 99), 3)},
        "aborted_in_engine": aborts,  # the probes included
        "seconds_to_idle_after_run": round(idle_after, 3),
        "after": {"running": metric(text, "glmserve:num_requests_running"),
                  "waiting": metric(text, "glmserve:num_requests_waiting"),
                  "kv_cache_usage": metric(text, "glmserve:kv_cache_usage_perc")},
        "rss_mib": {"after_warmup": round(rss_warm / 2**20, 1), "after_run": round(rss_end / 2**20, 1),
                    "growth": round((rss_end - rss_warm) / 2**20, 1)},
        "health": {"polls": len(health_codes), "non_200": sum(c != 200 for c in health_codes),
                   "p50_ms": round(percentile(health_latencies, 50) * 1e3, 1),
                   "p99_ms": round(percentile(health_latencies, 99) * 1e3, 1),
                   "max_ms": round(max(health_latencies, default=0) * 1e3, 1)},
        "abort_probe": {key: max((p[key] for p in probes), default=0) for key in probes[0]} if probes else {},
    }
    huge = beside["huge_prompts"]
    if huge:
        report["huge_prompts"] = {"megabytes": args.huge_prompt_mb, "statuses": huge["statuses"],
                                  "p50_s": round(percentile(huge["latencies"], 50), 3),
                                  "max_s": round(max(huge["latencies"]), 3)}
    if beside["stalled_connections"]:
        report["stalled_connections"] = {"held": args.stalled_connections, **beside["stalled_connections"]}
    margin = max(args.rss_margin_mib, 0.1 * rss_warm / 2**20)
    report["checks"] = {
        "no_failures": report["num_failures"] == 0,
        "all_accounted_for": tally.completed + tally.abandoned + len(tally.failures) == args.requests,
        "engine_idle": report["after"] == {"running": 0, "waiting": 0, "kv_cache_usage": 0},
        "rss_back_within_margin": rss_end - rss_warm <= margin * 2**20,
        "health_always_200": report["health"]["non_200"] == 0,
        "abort_within_two_steps": all(p["steps_after_hang_up"] <= 2 for p in probes),
    }
    if huge:
        report["checks"]["huge_prompts_refused_with_400"] = set(huge["statuses"]) == {"400"}
    return report


def start_own_server(args, workdir: Path):
    from glmserve.serving.templates import glm45_chat_template
    from glmserve.testing.checkpoint import write_random_checkpoint
    from glmserve.testing.server import start_server

    checkpoint = write_random_checkpoint(workdir / "ckpt", "air", chat_template=glm45_chat_template())
    script = workdir / "script.json"
    script.write_text(json.dumps(SCRIPT), encoding="utf-8")
    flags = ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45", "--served-model-name", "load",
             "--max-model-len", "2048", "--num-kv-blocks", str(args.num_kv_blocks),
             "--max-num-seqs", str(args.concurrency), "--scripted-output-file", str(script)]
    if args.step_delay_ms:
        flags += ["--inject-step-delay-ms", str(args.step_delay_ms)]
    return start_server([str(checkpoint), *flags], workdir / "server.log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--hang-up-fraction", type=float, default=0.1)
    p.add_argument("--warmup", type=int, help="requests before the RSS baseline (default: 2 x concurrency)")
    p.add_argument("--probes", type=int, default=5, help="abort probes after the load")
    p.add_argument("--rss-margin-mib", type=float, default=64.0,
                   help="RSS growth allowed after warm-up (or 10%% of the warm RSS, if larger)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="a running server (default: start one on a small random checkpoint)")
    p.add_argument("--model", default="load", help="with --url: the served model name")
    p.add_argument("--api-key")
    p.add_argument("--num-kv-blocks", type=int, default=4096, help="for the server this script starts")
    p.add_argument("--step-delay-ms", type=float, default=0.0,
                   help="for the server this script starts: pace its steps (the test's abort probe, on a fast CPU)")
    p.add_argument("--huge-prompt-mb", type=float, default=0.0,
                   help="beside the load, send chat prompts of this many MB one after another (each must get 400)")
    p.add_argument("--stalled-connections", type=int, default=0,
                   help="beside the load, hold this many connections that never finish their headers")
    p.add_argument("--time-limit", type=float, default=3600.0, help="give up after this many seconds")
    p.add_argument("--output", help="also write the JSON report here")
    args = p.parse_args(argv)
    args.warmup = 2 * args.concurrency if args.warmup is None else args.warmup

    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else start_own_server(args, Path(tmp))
        try:
            report = asyncio.run(asyncio.wait_for(run(args, args.url or server.url, args.model), args.time_limit))
        except TimeoutError:
            report = {"checks": {"finished_in_time": False}, "time_limit_s": args.time_limit}
        finally:
            if server is not None:
                server.stop()
                report_log = server.output()
        if server is not None:
            report["server_exit_code"] = server.process.returncode
            report["server_log_errors"] = [line for line in report_log.splitlines() if line.startswith("ERROR")][:10]
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    failed = [name for name, ok in report["checks"].items() if not ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
