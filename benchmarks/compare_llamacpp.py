#!/usr/bin/env python
"""glmserve beside llama.cpp, in one run: prefill time and decode tokens/s of the same checkpoint at given batch
sizes, each glmserve weight format beside llama.cpp's comparable GGUF type, and whether their greedy tokens agree
(../shared/reference/BENCH.md's llama.cpp rows, reproduced here).

Each --pairs entry GLMSERVE:LLAMA is measured on its own: both engines loaded, every batch size timed with the two
alternating, then both released (so memory holds one pair at a time, and --cpu-lock is held one pair at a time).
GLMSERVE is fp32, fp16 (--weight-dtype float16) or a --quantization method (int8, int4, q8_0, q4_0, ...); LLAMA a
GGUF type: f32 / f16 / bf16 / q8_0 written by llama.cpp's own convert_hf_to_gguf.py, q4_0 made from the f32 GGUF by
llama.cpp's own quantizer (llama_model_quantize, default parameters as `llama-quantize`), cached in --gguf-dir.
llama.cpp runs in a worker process under the Python that has llama-cpp-python (--llama-python; without it this
script says so and exits 0). Every batch is timed by glmserve.bench.offline.measure_batch: random prompt token ids
(as `glmserve bench offline` draws them), greedy, EOS ignored; a max_tokens=1 run times the prefill and a full run
the rest; engines alternate, medians, measurements disturbed by other processes left out.

With --context N, one sequence's decode after an N-token context instead (benchmarks/peers/llamacpp_context.py):
glmserve per --glmserve-kv-cache-dtypes beside llama.cpp per --llama-kv-types, on the shape with
max_position_embeddings 131072 (as benchmarks/long_context.py), the prefills cached before any timing; the weights
are the one --pairs entry's (default fp32:f32).

Examples:
    python benchmarks/compare_llamacpp.py bench-57m --cpu-lock /work/cpu.lock \\
        --output-json benchmarks/results/llamacpp-57m.json        # fp32:f32 int8:q8_0 int4:q4_0
    python benchmarks/compare_llamacpp.py bench-57m --context 32768 --output-len 33 --num-iters 3 \\
        --cpu-lock /work/cpu.lock --output-json benchmarks/results/llamacpp-32k-bench-57m.json
    python benchmarks/compare_llamacpp.py bench-57m --threads 1 --batch-size 1 2 --input-len 32 --output-len 16 \\
        --num-iters 1 --pairs fp16:bf16 q8_0:q8_0
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from peers.llamacpp import CONVERTED_TYPES, QUANTIZED_TYPES, LlamaCppEngine, ensure_gguf, llama_cpp_version  # noqa

from glmserve.bench.host import exclusive_lock  # noqa: E402
from glmserve.bench.offline import BENCH_CACHE, add_measurement_args  # noqa: E402
from glmserve.config import QUANTIZATION_METHODS  # noqa: E402

LLAMA_PYTHON = Path("/work/peers/llama-venv/bin/python")
GLMSERVE_FORMATS = ("fp32", "fp16", *QUANTIZATION_METHODS)
LLAMA_TYPES = (*CONVERTED_TYPES, *QUANTIZED_TYPES)


def pair(text: str) -> tuple[str, str]:
    """GLMSERVE:LLAMA, e.g. int8:q8_0."""
    glmserve, _, llama = text.partition(":")
    if glmserve not in GLMSERVE_FORMATS or llama not in LLAMA_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: want GLMSERVE:LLAMA with GLMSERVE one of "
                                         f"{', '.join(GLMSERVE_FORMATS)} and LLAMA one of {', '.join(LLAMA_TYPES)}")
    return glmserve, llama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="checkpoint directory or named shape (bench-57m, bench-528m, air-100m)")
    p.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON,
                   help=f"a Python with llama-cpp-python, torch and transformers (default {LLAMA_PYTHON})")
    p.add_argument("--converter", type=Path,
                   help="llama.cpp's convert_hf_to_gguf.py (default: SRC/llama_cpp_python-VERSION/vendor/llama.cpp/, "
                        "SRC being src/ beside the --llama-python venv)")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE, help="where named shapes are written")
    p.add_argument("--gguf-dir", type=Path, default=BENCH_CACHE / "gguf", help="where converted GGUF files are cached")
    p.add_argument("--pairs", nargs="+", type=pair, metavar="GLMSERVE:LLAMA",
                   help="glmserve format beside llama.cpp GGUF type, one pair at a time (default: fp32:f32 int8:q8_0 "
                        "int4:q4_0; with --context: fp32:f32, and only one)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    p.add_argument("--cpu-lock", type=Path, help="hold this file's exclusive flock around each pair's measurement "
                                                 "(with --context: while decode is timed)")
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
    args = p.parse_args(argv)
    args.pairs = args.pairs or ([("fp32", "f32")] if args.context else [("fp32", "f32"), ("int8", "q8_0"),
                                                                        ("int4", "q4_0")])
    if args.context and len(args.pairs) != 1:
        p.error("--context takes one --pairs entry")
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (decode time is a full run minus a max_tokens=1 run)")
    return args


def report(args, pairs: list[dict]) -> str:
    lines = ["", f"== {args.input_len}-token prompts, {args.output_len} new tokens, greedy, {args.threads} threads, "
                 f"median of {args.num_iters}; decode tok/s ==",
             "pair (glmserve : llama.cpp) | batch | glmserve | llama.cpp | glmserve/llama.cpp | prefill ms glmserve / "
             "llama.cpp | greedy mismatches"]
    for run in pairs:
        g, ll = run["engines"]
        for entry in run["results"]:
            c = entry["comparisons"][ll]
            lines.append(f"{run['pair']:27s} | {entry['batch']:5d} | {entry[g]['median_decode_tps']:8.1f} | "
                         f"{entry[ll]['median_decode_tps']:9.1f} | {c['ratio']:17.2f}x | "
                         f"{entry[g]['median_prefill_s'] * 1e3:8.1f} / {entry[ll]['median_prefill_s'] * 1e3:8.1f} | "
                         f"{c['greedy_mismatched_sequences']}/{entry['batch']} sequences "
                         f"({c['greedy_mismatched_tokens']} tokens)")
            disturbed = sum(sum(entry[n]["contended"]) for n in (g, ll))
            if disturbed:
                lines.append(f"{'':27s}   ({disturbed} measurement(s) disturbed by other processes"
                             + (": every one, for some engine)" if any(all(entry[n]["contended"]) for n in (g, ll))
                                else ", left out of the medians)"))
    return "\n".join(lines)


def glmserve_engine(fmt: str, directory: Path, args, max_batch: int):
    from glmserve.bench.engines import GlmserveEngine

    weight_dtype = "float16" if fmt == "fp16" else "auto"
    quantization = None if fmt in ("fp32", "fp16") else fmt
    return GlmserveEngine(directory, max_batch, args.input_len, args.output_len, "auto", "cpu", weight_dtype,
                          quantization)


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
    from glmserve.bench.offline import measure_batch, random_prompts

    torch.set_num_threads(args.threads)
    from long_context import MAX_POSITIONS

    directory = prepare_checkpoint(args.model, args.cache_dir, MAX_POSITIONS if args.context else None)
    ggufs, conversions, tensor_types = {}, [], {}
    for _, outtype in args.pairs:  # made before any measurement: a conversion is not timed, nor locked
        ggufs[outtype], commands, types = ensure_gguf(args.llama_python, converter, directory, outtype,
                                                      args.gguf_dir, args.threads)
        conversions += commands
        if types is not None:
            tensor_types[outtype] = types

    if args.context:
        return run_context(args, directory, ggufs, tensor_types, conversions, version)
    max_batch = max(args.batch_size)
    prompts = random_prompts(directory, max_batch, args.input_len, args.seed)
    print(f"checkpoint {directory}; llama-cpp-python {version}; {args.threads} threads", flush=True)
    pairs, workers = [], {}
    for fmt, outtype in args.pairs:
        with exclusive_lock(args.cpu_lock):
            glmserve = glmserve_engine(fmt, directory, args, max_batch)
            llama = LlamaCppEngine(f"llama.cpp-{outtype}", args.llama_python, ggufs[outtype], args.threads,
                                   max_batch, args.input_len + args.output_len, max(512, max_batch * args.input_len))
            try:
                print(f"-- {glmserve.name} beside {llama.name}", flush=True)
                results = [measure_batch(args, [glmserve, llama], prompts[:b]) for b in args.batch_size]
            finally:
                llama.close()
        workers[llama.name] = {"command": " ".join(llama.command), "context": llama.info["context_params"],
                               "system_info": llama.info["system_info"]}
        pairs.append({"pair": f"{fmt}:{outtype}", "engines": [glmserve.name, llama.name], "results": results})
        del glmserve  # its weights go before the next pair's load
        gc.collect()
        print(report(args, pairs[-1:]), flush=True)
    print(report(args, pairs))
    if args.output_json:
        workload = {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                    "num_iters": args.num_iters, "prompt_seed": args.seed, "glmserve_dtype": "auto",
                    "glmserve_prefix_caching": False, "llama_cpp_bos_added": False}
        write_json(args, directory, workers, ggufs, tensor_types, conversions, version, workload, {"pairs": pairs})
    return 0


def run_context(args, directory: Path, ggufs: dict, tensor_types: dict, conversions: list, version: str) -> int:
    """--context: llama.cpp's prefilled states first (cached), then the timed decode of every engine."""
    from peers import llamacpp_context

    from glmserve.bench.offline import random_prompts

    gguf = ggufs[args.pairs[0][1]]
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
        workers = {e.name: {"command": " ".join(e.command), "context": e.info["context_params"],
                            "system_info": e.info["system_info"]} for e in engines.values()}
        workload = {"context": args.context, "batch": 1, "output_len": args.output_len, "greedy": True,
                    "num_iters": args.num_iters, "prompt_seed": args.seed, "llama_cpp_kv_types": args.llama_kv_types,
                    "llama_cpp_flash_attn": args.flash_attn, "llama_cpp_states": states,
                    "glmserve_kv_cache_dtypes": args.glmserve_kv_cache_dtypes,
                    "glmserve_cache": "random keys and values (benchmarks/long_context.py), no prefill",
                    "cpu_lock": str(args.cpu_lock) if args.cpu_lock else None}
        write_json(args, directory, workers, ggufs, tensor_types, conversions, version, workload,
                   {"results": result})
    return 0


def write_json(args, directory: Path, workers: dict, ggufs: dict, tensor_types: dict, conversions: list,
               version: str, workload: dict, results: dict) -> None:
    import tokenizers
    import torch

    from glmserve.bench.host import cpu_name, glmserve_revision, write_results

    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "affinity": sorted(os.sched_getaffinity(0)), "threads": args.threads,
                    "llama_cpp_system_info": next(iter(workers.values()))["system_info"]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "llama_cpp_python": version},
        "glmserve_revision": glmserve_revision(),
        "checkpoint": {"path": str(directory), "config": json.loads((directory / "config.json").read_text())},
        "gguf": {t: {"path": str(p), "bytes": p.stat().st_size, "tensor_types": tensor_types.get(t)}
                 for t, p in ggufs.items()},
        "commands": {"conversions (this run; none if all were cached)": [" ".join(c) for c in conversions],
                     "workers": {name: w["command"] for name, w in workers.items()}},
        "llama_cpp_context": {name: w["context"] for name, w in workers.items()},
        "workload": workload,
        **results,
    }
    write_results(args.output_json, report)
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    sys.exit(main())
