#!/usr/bin/env python
"""Parallel modes side by side on one machine: 16 concurrent streams against a server in each mode, one run.

Each mode is a fresh `glmserve serve` on a random-weight checkpoint (bench-57m by default) with the same cores: one
process with 2 threads, or 2 processes of 1 thread each (tp 2, pp 2, dp 2). `glmserve bench serve` sends the same
random prompts (--num-prompts, at most --concurrency at once, every answer --output-len tokens) after a short
warm-up, and the table gives output tokens/s and time per output token (TPOT) for each mode. A mode that fails to
start is reported as failed and the others still run. --offline runs one LLMEngine in this process, so it has no
dp 2 (replicas are processes behind the server: measure it in server mode). Run it under the exclusive CPU lock:
the numbers are only comparable on a quiet machine.

    flock -x /work/cpu.lock python benchmarks/parallel_modes.py --output-json benchmarks/results/parallel-modes.json
    python benchmarks/parallel_modes.py --offline --modes 1x2threads pp2 pp2-one-micro-batch   # the engine alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.host import cpu_name
from glmserve.testing.server import start_server

THREADS = 2  # the cores every mode gets
# EngineConfig's fields; the server gets them as flags of the same names.
MODES: dict[str, dict[str, int]] = {
    "1x2threads": {},  # one process, 2 intra-op threads
    "tp2": {"tensor_parallel_size": 2},  # 2 processes of 1 thread (the engine splits the threads)
    "pp2": {"pipeline_parallel_size": 2},  # 2 stages; a step in 2 micro-batches when each gets >= 128 tokens
    "pp2-micro-batches-of-8": {"pipeline_parallel_size": 2, "pp_max_micro_batch_size": 8},  # decode split too
    "pp2-one-micro-batch": {"pipeline_parallel_size": 2, "pp_max_micro_batch_size": 1024},  # never split
    "dp2": {"data_parallel_size": 2},  # 2 replicas behind one server
}


def flags(name: str) -> list[str]:
    return [arg for key, value in MODES[name].items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def run_offline(name: str, checkpoint: Path, args) -> dict:
    """The engine alone, in this process (no HTTP, no client): all prompts at once, at most --concurrency running;
    decode tok/s over the steps after the last prefill."""
    import torch

    from glmserve.bench.offline import random_prompts
    from glmserve.config import EngineConfig
    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    if "data_parallel_size" in MODES[name]:
        return {"mode": name, "error": "not an offline mode: dp replicas run behind the server (drop --offline)"}
    torch.set_num_threads(THREADS)
    try:
        engine = LLMEngine(EngineConfig(model=str(checkpoint), kv_cache_memory_gb=0.5, max_num_seqs=args.concurrency,
                                        **MODES[name]), progress=False)
    except TypeError as e:  # a mode this build does not have
        return {"mode": name, "error": str(e)}
    try:
        for seed, max_tokens in ((1, 4), (0, args.output_len)):  # a short warm-up first
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            for i, prompt in enumerate(random_prompts(checkpoint, args.concurrency, args.input_len, seed)):
                engine.add_request(f"{seed}-{i}", prompt, params)
            if seed:
                while engine.has_unfinished_requests():
                    engine.step()
        steps, start = [], time.perf_counter()
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            tokens = sum(len(o.new_token_ids) for o in engine.step())
            steps.append((time.perf_counter() - t, tokens))
        total = time.perf_counter() - start
    finally:
        engine.close()
    decode = steps[-(args.output_len - 1):]  # one token per request each; all were prefilled in the first steps
    return {"mode": name, "offline": True, "output_tok_s": round(sum(n for _, n in steps) / total, 1),
            "decode_tok_s": round(sum(n for _, n in decode) / sum(t for t, _ in decode), 1),
            "mean_tpot_ms": round(1e3 * sum(t for t, _ in decode) / len(decode), 2)}


def run_mode(name: str, checkpoint: Path, args, workdir: Path) -> dict:
    if args.offline:
        return run_offline(name, checkpoint, args)
    try:
        server = start_server([str(checkpoint), *flags(name), "--kv-cache-memory-gb", "0.5",
                               "--max-num-seqs", str(args.concurrency)], workdir / f"{name}.log",
                              env={"OMP_NUM_THREADS": str(THREADS)}, timeout=300)
    except RuntimeError as e:
        return {"mode": name, "error": str(e).splitlines()[-1][:300]}
    try:
        results = {}
        for phase, prompts in (("warm-up", args.concurrency), ("measured", args.num_prompts)):
            out = workdir / f"{name}-{phase}.json"
            bench = subprocess.run(
                [sys.executable, "-m", "glmserve", "bench", "serve", "--base-url", server.url, "--tokenizer",
                 str(checkpoint), "--num-prompts", str(prompts), "--max-concurrency", str(args.concurrency),
                 "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                 "--ignore-eos", "--disable-tqdm", "--seed", str(len(results)), "--result-filename", str(out)],
                capture_output=True, text=True, timeout=1800)
            if bench.returncode:
                return {"mode": name, "error": (bench.stderr or bench.stdout)[-300:]}
            results = json.loads(out.read_text())["results"][0]
    finally:
        server.stop()
    return {"mode": name, "flags": flags(name), "output_tok_s": round(results["output_throughput"], 1),
            "mean_tpot_ms": round(results["mean_tpot_ms"], 2), "median_tpot_ms": round(results["median_tpot_ms"], 2),
            "mean_ttft_ms": round(results["mean_ttft_ms"], 1), "completed": results["completed"],
            "failed": results["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-57m", help="a named shape or a checkpoint directory")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "glmserve-bench"))
    p.add_argument("--offline", action="store_true",
                   help="the engine in this process instead of a server (--concurrency prompts, all at once)")
    p.add_argument("--output-json", help="also write the rows here")
    args = p.parse_args(argv)
    checkpoint = prepare_checkpoint(args.model, Path(args.cache_dir))
    load_before = os.getloadavg()  # the lock keeps benchmarks apart, not everything else this machine runs
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_mode(name, checkpoint, args, Path(tmp)) for name in args.modes]
    print(f"{args.model}: {args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out each, "
          f"{args.concurrency} at once, {THREADS} cores per mode")
    columns = (["output_tok_s", "decode_tok_s", "mean_tpot_ms"] if args.offline else
               ["output_tok_s", "mean_tpot_ms", "median_tpot_ms", "mean_ttft_ms"])
    print(f"{'mode':<22}" + "".join(f"{c:>16}" for c in columns))
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:<22} failed: {row['error']}")
        else:
            print(f"{row['mode']:<22}" + "".join(f"{row[c]:>16}" for c in columns))
    if args.output_json:
        report = {"model": args.model, "offline": args.offline, "concurrency": args.concurrency,
                  "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                  "threads": THREADS, "cpu": cpu_name(), "load_average_before": load_before,
                  "load_average_after": os.getloadavg(), "rows": rows}
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
