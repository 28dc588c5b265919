#!/usr/bin/env python
"""Prefill throughput of quantized weights, the native small-M kernels alone (GLMSERVE_PREFILL_GEMM=0) against
prefill_gemm's torch GEMMs (layers/quantization/prefill_gemm.py), A/B in one process: b prompts of --input-len
random tokens, max_tokens 1, prefix caching off, median of --num-iters, the two paths alternating.

    python benchmarks/quantized_prefill.py bench-57m --quantization int8 int4 fp8 --batch-size 1 8 16 \\
        --output-json benchmarks/results/quantized-prefill-bench-57m.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.host import OtherLoad, cpu_name, glmserve_revision, write_results
from glmserve.bench.offline import BENCH_CACHE, random_prompts
from glmserve.llm import LLM
from glmserve.types import SamplingParams

PATHS = {"native": "0", "prefill_gemm": "1"}  # GLMSERVE_PREFILL_GEMM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="named bench shape (bench-57m, bench-528m) or checkpoint directory")
    p.add_argument("--quantization", nargs="+", default=["int8", "int4", "fp8"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = Path(args.model) if Path(args.model).is_dir() else prepare_checkpoint(args.model, BENCH_CACHE)
    load = OtherLoad()
    rows = []
    for method in args.quantization:
        llm = LLM(str(directory), quantization=method, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for batch in args.batch_size:
            prompts = [{"prompt_token_ids": p} for p in random_prompts(directory, batch, args.input_len, 1234)]
            times = {name: [] for name in PATHS}
            for rep in range(args.num_iters + 1):  # the first round warms both paths up
                for name in PATHS if rep % 2 else list(PATHS)[::-1]:
                    os.environ["GLMSERVE_PREFILL_GEMM"] = PATHS[name]
                    t0 = time.perf_counter()
                    llm.generate(prompts, params)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            os.environ.pop("GLMSERVE_PREFILL_GEMM")
            line = {"quantization": method, "batch": batch, "rows": batch * args.input_len}
            for name, ts in times.items():
                line[f"{name}_ms"] = round(statistics.median(ts) * 1e3, 1)
                line[f"{name}_tok_s"] = round(batch * args.input_len / statistics.median(ts), 1)
            line["speedup"] = round(line["native_ms"] / line["prefill_gemm_ms"], 2)
            print(line, flush=True)
            rows.append(line)
        del llm
    if args.output_json:
        write_results(args.output_json, {
            "command": "benchmarks/quantized_prefill.py", "model": args.model, "cpu": cpu_name(),
            "threads": args.threads, "input_len": args.input_len, "num_iters": args.num_iters,
            "glmserve_revision": glmserve_revision(), "other_processes_cores": load.cores(), "results": rows})


if __name__ == "__main__":
    main()
