#!/usr/bin/env python
"""Parallel modes side by side on one machine: 16 concurrent streams against a server in each mode, one run.

Each mode is a fresh `glmserve serve` on a random-weight checkpoint (bench-57m by default) with the same cores: one
process with 2 threads, or 2 processes of 1 thread each (tp 2, pp 2, dp 2). `glmserve bench serve` sends the same
random prompts (--num-prompts, at most --concurrency at once, every answer --output-len tokens) after a short
warm-up, and the table gives output tokens/s and time per output token (TPOT) for each mode. A mode the build does
not know (dp 2 before data parallelism is merged) is reported as failed and the others still run. Run it under the
exclusive CPU lock: the numbers are only comparable on a quiet machine.

    flock -x /work/cpu.lock python benchmarks/parallel_modes.py --output-json benchmarks/results/parallel-modes.json
    python benchmarks/parallel_modes.py --modes 1x2threads pp2 pp2-one-micro-batch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.testing.server import free_port, start_server

THREADS = 2  # the cores every mode gets
MODES: dict[str, list[str]] = {
    "1x2threads": [],  # one process, 2 intra-op threads
    "tp2": ["--tensor-parallel-size", "2"],  # 2 processes of 1 thread (the engine splits the threads)
    "pp2": ["--pipeline-parallel-size", "2"],  # a step's batch in 2 micro-batches through 2 stages
    "pp2-one-micro-batch": ["--pipeline-parallel-size", "2", "--pp-max-micro-batch-size", "1024"],  # no overlap
    "dp2": ["--data-parallel-size", "2"],  # 2 replicas behind one server
}


def run_mode(name: str, checkpoint: Path, args, workdir: Path) -> dict:
    try:
        server = start_server([str(checkpoint), *MODES[name], "--kv-cache-memory-gb", "0.5",
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
    return {"mode": name, "flags": MODES[name], "output_tok_s": round(results["output_throughput"], 1),
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
    p.add_argument("--output-json", help="also write the rows here")
    args = p.parse_args(argv)
    checkpoint = prepare_checkpoint(args.model, Path(args.cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_mode(name, checkpoint, args, Path(tmp)) for name in args.modes]
    print(f"{args.model}: {args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out each, "
          f"{args.concurrency} at once, {THREADS} cores per mode")
    print(f"{'mode':<22} {'output tok/s':>12} {'mean TPOT ms':>13} {'median TPOT ms':>15} {'mean TTFT ms':>13}")
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:<22} failed: {row['error']}")
        else:
            print(f"{row['mode']:<22} {row['output_tok_s']:>12} {row['mean_tpot_ms']:>13} "
                  f"{row['median_tpot_ms']:>15} {row['mean_ttft_ms']:>13}")
    if args.output_json:
        report = {"model": args.model, "concurrency": args.concurrency, "num_prompts": args.num_prompts,
                  "input_len": args.input_len, "output_len": args.output_len, "threads": THREADS, "rows": rows}
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
