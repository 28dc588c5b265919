#!/usr/bin/env python
"""glmserve beside llama.cpp, in one run: prefill time and decode tokens/s of the same checkpoint at given batch
sizes, and whether their greedy tokens agree (../shared/reference/BENCH.md's llama.cpp rows, reproduced here).

llama.cpp runs in a worker process under the Python that has llama-cpp-python (--llama-python; without it this
script says so and exits 0), from GGUF files converted once per type by llama.cpp's own converter and cached in
--gguf-dir. Every batch is timed by glmserve.bench.offline.measure_batch: random prompt token ids (as
`glmserve bench offline` draws them), greedy, EOS ignored; a max_tokens=1 run times the prefill and a full run
the rest; engines alternate, medians, measurements disturbed by other processes left out.

Examples:
    python benchmarks/compare_llamacpp.py bench-57m --output-json benchmarks/results/llamacpp-57m.json
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
    p.add_argument("--outtypes", nargs="+", default=["f32", "bf16", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF types, one llama.cpp engine each")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--glmserve-weight-dtypes", nargs="+", default=["auto", "float16"], choices=["auto", "float16"],
                   help="glmserve engines to run: fp32 weights (auto) and fp16-stored weights (--weight-dtype)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    add_measurement_args(p, num_iters=5)
    p.add_argument("--output-json", type=Path, help="write the results here")
    args = p.parse_args(argv)
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
    directory = prepare_checkpoint(args.model, args.cache_dir)
    ggufs, conversions = {}, []
    for outtype in args.outtypes:
        ggufs[outtype], command = ensure_gguf(args.llama_python, converter, directory, outtype, args.gguf_dir)
        if command:
            conversions.append(command)

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
        write_json(args, directory, llama, ggufs, conversions, version, results)
    return 0


def write_json(args, directory: Path, llama: list, ggufs: dict, conversions: list, version: str,
               results: list[dict]) -> None:
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
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                     "num_iters": args.num_iters, "prompt_seed": args.seed, "glmserve_dtype": "auto",
                     "glmserve_weight_dtypes": args.glmserve_weight_dtypes,
                     "glmserve_prefix_caching": False, "llama_cpp_bos_added": False},
        "results": results,
    }
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    sys.exit(main())
