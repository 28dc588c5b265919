"""Data parallelism as a server: one engine process with 2 threads against `--data-parallel-size 2` (2 replica
processes, 1 thread each), on the same cores, at 16 concurrent streams (`glmserve bench serve`).

Per server: random prompts on /v1/completions (`--repeats` runs: output tok/s, TPOT, TTFT), then the multi-turn chat
dataset (later turns extend earlier prompts), whose prefix-cache hit rate, read from /metrics, shows whether the
replicas keep finding their conversations' prefixes (one engine holds every prefix: the rate to match). Run it on a
quiet machine (under the exclusive CPU lock here):

    flock -x /work/cpu.lock python benchmarks/data_parallel.py \\
        --output-json benchmarks/results/data-parallel-bench-57m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.testing.server import start_server

MODES = {"1 process x 2 threads": [], "dp 2 (1 thread each)": ["--data-parallel-size", "2"]}


def _counters(url: str) -> dict[str, float]:
    """The /metrics samples this benchmark reports (labelled ones keyed with their labels)."""
    wanted = ("glmserve:prefix_cache_hits_total", "glmserve:prefix_cache_queries_total", "glmserve:dp_requests_total",
              "glmserve:dp_router_decisions_total")
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _bench(url: str, flags: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "glmserve", "bench", "serve", "--base-url", url, "--disable-tqdm",
                    "--result-filename", str(out), "--seed", "0", *flags], check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())["results"][0]
    assert result["failed"] == 0, result["errors"][:3]
    return {k: round(result[k], 2) for k in ("output_throughput", "median_tpot_ms", "mean_tpot_ms",
                                              "median_ttft_ms", "p99_ttft_ms")}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-57m")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chat-prompts", type=int, default=48)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each server (split among replicas)")
    p.add_argument("--output-json")
    args = p.parse_args()
    directory = prepare_checkpoint(args.model, Path(tempfile.gettempdir()) / "glmserve-bench")
    random_flags = ["--endpoint", "/v1/completions", "--dataset-name", "random", "--num-prompts",
                    str(args.num_prompts), "--random-input-len", str(args.input_len), "--random-output-len",
                    str(args.output_len), "--ignore-eos", "--max-concurrency", str(args.concurrency),
                    "--extra-body", '{"return_token_ids": true}']
    chat_flags = ["--dataset-name", "chat", "--num-prompts", str(args.chat_prompts), "--chat-output-len", "32",
                  "--ignore-eos", "--max-concurrency", str(args.concurrency), "--extra-body",
                  '{"return_token_ids": true}']
    report = {"model": args.model, "threads": args.threads, "cpus": len(os.sched_getaffinity(0)),
              "random": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                         "output_len": args.output_len, "concurrency": args.concurrency}, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flags in MODES.items():
            server = start_server([str(directory), *flags, "--max-num-seqs", str(args.concurrency),
                                   "--kv-cache-memory-gb", "0.25"], Path(tmp) / "server.log",
                                  env={"OMP_NUM_THREADS": str(args.threads)}, timeout=180)
            try:
                runs = [_bench(server.url, random_flags, Path(tmp) / f"r{i}.json") for i in range(args.repeats)]
                before = _counters(server.url)
                chat = _bench(server.url, chat_flags, Path(tmp) / "chat.json")
                counts = _delta(_counters(server.url), before)
            finally:
                server.stop()
            hits, queries = counts.pop("glmserve:prefix_cache_hits_total"), counts.pop(
                "glmserve:prefix_cache_queries_total")
            report["modes"][mode] = {"random": runs, "chat": {**chat, "prefix_cache_hit_rate": round(hits / queries, 3),
                                                              "prompt_tokens": queries, **counts}}
            print(mode, json.dumps(report["modes"][mode], indent=1), flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
