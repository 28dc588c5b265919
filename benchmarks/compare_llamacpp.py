#!/usr/bin/env python
"""glmserve beside llama.cpp, in one run: prefill time and decode tokens/s of the same checkpoint at given batch
sizes, and whether their greedy tokens agree (../shared/reference/BENCH.md's llama.cpp rows, reproduced here).

llama.cpp runs in a worker process under the Python that has llama-cpp-python (--llama-python; without it this
script says so and exits 0), from GGUF files converted once per type by llama.cpp's own converter and cached in
--gguf-dir. Every batch is timed by glmserve.bench.offline.measure_batch: random prompt token ids (as
`glmserve bench offline` draws them), greedy, EOS ignored; a max_tokens=1 run times the prefill and a full run
the rest; engines alternate, medians, measurements disturbed by other processes left out.

With --context N, one sequence's decode after an N-token context instead (benchmarks/peers/llamacpp_context.py):
glmserve per --glmserve-kv-cache-dtypes beside llama.cpp per --llama-kv-types, on the shape with
max_position_embeddings 131072 (as benchmarks/long_context.py), the prefills cached before any timing.

Examples:
    python benchmarks/compare_llamacpp.py bench-57m --output-json benchmarks/results/llamacpp-57m.json
    python benchmarks/compare_llamacpp.py bench-57m --context 32768 --output-len 33 --num-iters 3 \
        --cpu-lock /work/cpu.lock --output-json benchmarks/results/llamacpp-32k-bench-57m.json
    python benchmarks/compare_llamacpp.py bench-57m --threads 1 --batch-size 1 2 --input-len 32 --output-len 16 \\
        --num-iters 1 --outtypes f32 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from peers.llamacpp import LlamaCppEngine, ensure_gguf, llama_cpp_version  # noqa: E402

from glmserve.bench.offline import BENCH_CACHE, add_measurement_args  # noqa: E402

LLAMA_PYTHON = Path("/work/peers/llama-venv/bin/python")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="checkpoint directory or named shape (bench-57m, air-100m)")
    p.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON,
                   help=f"a Python with llama-cpp-python, torch and transformers (default {LLAMA_PYTHON})")
    p.add_argument("--converter", type=Path,
                   help="llama.cpp's convert_hf_to_gguf.py (default: SRC/llama_cpp_python-VERSION/vendor/llama.cpp/, "
                        "SRC being src/ beside the --llama-python venv)")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE, help="where named shapes are written")
    p.add_argument("--gguf-dir", type=Path, default=BENCH_CACHE / "gguf", help="where converted GGUF files are cached")
    p.add_argument("--outtypes", nargs="+", choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF types, one llama.cpp engine each (default f32 bf16 q8_0; with --context: f32, one type)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--glmserve-weight-dtypes", nargs="+", default=["auto", "float16"], choices=["auto", "float16"],
                   help="glmserve engines to run: fp32 weights (auto) and fp16-stored weights (--weight-dtype)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    add_measurement_args(p, num_iters=5)
    p.add_argument("--output-json", type=Path, help="write the results here")
    long = p.add_argument_group("long context (--context)")
    long.add_argument("--context", type=int, default=0, help="decode one sequence after this many tokens")
    long.add_argument("--llama-kv-types", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "q8_0"],
                      help="llama.cpp's type_k and type_v, one engine each")
    long.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"],
                      help="llama.cpp's flash_attn_type (a q8_0 V cache needs it: auto turns it on)")
    long.add_argument("--glmserve-kv-cache-dtypes", nargs="+", default=["auto", "fp8"])
    long.add_argument("--attention-backend", help="glmserve's (default: the engine's)")
    long.add_argument("--prefill-only", action="store_true",
                      help="only prefill and cache llama.cpp's states (a long job: run it under yield_to_benchmarks)")
    long.add_argument("--cpu-lock", type=Path, help="hold this file's exclusive flock while timing decode")
    args = p.parse_args(argv)
    args.outtypes = args.outtypes or (["f32"] if args.context else ["f32", "bf16", "q8_0"])
    if args.context and len(args.outtypes) != 1:
        p.error("--context takes one --outtypes")
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (decode time is a full run minus a max_tokens=1 run)")
    return args


def report(args, names: list[str], results: list[dict]) -> str:
    lines = ["", f"== {args.input_len}-token prompts, {args.output_len} new tokens, greedy, {args.threads} threads, "
                 f"median of {args.num_iters} ==",
             "batch | engine          | prefill ms | decode tok/s | glmserve/engine | greedy mismatches"]
    for entry in results:
        for n in names:
            e, c = entry[n], entry.get("comparisons", {}).get(n)
            compared = (f"{c['ratio']:15.2f}x | {c['greedy_mismatched_sequences']}/{entry['batch']} sequences"
                        f" ({c['greedy_mismatched_tokens']} tokens)" if c else f"{'-':>16} | -")
            lines.append(f"{entry['batch']:5d} | {n:15s} | {e['median_prefill_s'] * 1e3:10.1f} | "
                         f"{e['median_decode_tps']:12.1f} | {compared}")
        disturbed = sum(sum(entry[n]["contended"]) for n in names)
        if disturbed:
            lines.append(f"        ({disturbed} measurement(s) disturbed by other processes"
                         + (": every one, for some engine)" if any(all(entry[n]["contended"]) for n in names)
                            else ", left out of the medians)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = llama_cpp_version(args.llama_python)
    if version is None:
        print(f"llama-cpp-python not installed at {args.llama_python}: skipping")
        return 0
    converter = args.converter or (args.llama_python.parents[2] / "src" / f"llama_cpp_python-{version}" / "vendor"
                                   / "llama.cpp" / "convert_hf_to_gguf.py")

    import torch

    from glmserve.bench.checkpoints import prepare_checkpoint
    from glmserve.bench.engines import GlmserveEngine
    from glmserve.bench.offline import measure_batch, random_prompts

    torch.set_num_threads(args.threads)
    from long_context import MAX_POSITIONS

    directory = prepare_checkpoint(args.model, args.cache_dir, MAX_POSITIONS if args.context else None)
    ggufs, conversions = {}, []
    for outtype in args.outtypes:
        ggufs[outtype], command = ensure_gguf(args.llama_python, converter, directory, outtype, args.gguf_dir)
        if command:
            conversions.append(command)

    if args.context:
        return run_context(args, directory, ggufs, conversions, version)
    max_batch = max(args.batch_size)
    glmserve = [GlmserveEngine(directory, max_batch, args.input_len, args.output_len, "auto", "cpu", weight_dtype)
                for weight_dtype in args.glmserve_weight_dtypes]
    llama = [LlamaCppEngine(f"llama.cpp-{t}", args.llama_python, ggufs[t], args.threads, max_batch,
                            args.input_len + args.output_len, max(512, max_batch * args.input_len))
             for t in args.outtypes]
    engines = glmserve + llama
    try:
        prompts = random_prompts(directory, max_batch, args.input_len, args.seed)
        print(f"checkpoint {directory}; llama-cpp-python {version}; {args.threads} threads", flush=True)
        results = [measure_batch(args, engines, prompts[:b]) for b in args.batch_size]
    finally:
        for engine in llama:
            engine.close()
    print(report(args, [e.name for e in engines], results))
    if args.output_json:
        workload = {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                    "num_iters": args.num_iters, "prompt_seed": args.seed, "glmserve_dtype": "auto",
                    "glmserve_weight_dtypes": args.glmserve_weight_dtypes,
                    "glmserve_prefix_caching": False, "llama_cpp_bos_added": False}
        write_json(args, directory, llama, ggufs, conversions, version, workload, results)
    return 0


def run_context(args, directory: Path, ggufs: dict, conversions: list, version: str) -> int:
    """--context: llama.cpp's prefilled states first (cached), then the timed decode of every engine."""
    from peers import llamacpp_context

    from glmserve.bench.offline import random_prompts

    gguf = ggufs[args.outtypes[0]]
    prompt = random_prompts(directory, 1, args.context, args.seed)[0]
    engines = llamacpp_context.llama_engines(args, gguf)
    try:
        states = llamacpp_context.ensure_states(args, gguf, engines, prompt)
        if args.prefill_only:
            return 0
        runners = llamacpp_context.glmserve_runners(args, directory)
        result = llamacpp_context.measure(args, runners, engines, states)
    finally:
        for engine in engines.values():
            engine.close()
    print(llamacpp_context.report(args, result, states))
    if args.output_json:
        workload = {"context": args.context, "batch": 1, "output_len": args.output_len, "greedy": True,
                    "num_iters": args.num_iters, "prompt_seed": args.seed, "llama_cpp_kv_types": args.llama_kv_types,
                    "llama_cpp_flash_attn": args.flash_attn, "llama_cpp_states": states,
                    "glmserve_kv_cache_dtypes": args.glmserve_kv_cache_dtypes,
                    "glmserve_cache": "random keys and values (benchmarks/long_context.py), no prefill",
                    "cpu_lock": str(args.cpu_lock) if args.cpu_lock else None}
        write_json(args, directory, list(engines.values()), ggufs, conversions, version, workload, result)
    return 0


def write_json(args, directory: Path, llama: list, ggufs: dict, conversions: list, version: str, workload: dict,
               results) -> None:
    import tokenizers
    import torch

    from glmserve.bench.host import cpu_name, glmserve_revision

    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "affinity": sorted(os.sched_getaffinity(0)), "threads": args.threads,
                    "llama_cpp_system_info": llama[0].info["system_info"]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "llama_cpp_python": version},
        "glmserve_revision": glmserve_revision(),
        "checkpoint": {"path": str(directory), "config": json.loads((directory / "config.json").read_text())},
        "gguf": {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in ggufs.items()},
        "commands": {"conversions (this run; none if all were cached)": [" ".join(c) for c in conversions],
                     "workers": {e.name: " ".join(e.command) for e in llama}},
        "llama_cpp_context": {e.name: e.info["context_params"] for e in llama},
        "workload": workload,
        "results": results,
    }
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    sys.exit(main())
