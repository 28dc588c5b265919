"""`glmserve bench offline`: a checkpoint's prefill and decode throughput in-process, at given batch sizes and
lengths, beside the memory-bandwidth roofline (and, with --engines glmserve transformers, transformers' in the
same run).

Each batch of b sequences gets `--input-len` random prompt token ids and decodes `--output-len` tokens greedily,
EOS ignored. Every repetition times a `max_tokens=1` run (prefill plus the first token) and a full run:
prefill tok/s = b * input_len / prefill, decode tok/s = b * (output_len - 1) / (full - prefill). Engines alternate
(the order flips every repetition), so machine noise hits both; medians leave out measurements during which other
processes used more than --max-other-load cores. The roofline is the decode rate that reading the weights once per
step at this machine's measured bandwidth allows (glmserve.bench.roofline).

MODEL is a checkpoint directory (default: `glmserve serve`'s) or a named random-weight shape (bench-57m,
air-100m), written once into --cache-dir. Examples:
    glmserve bench offline bench-57m --batch-size 1 16 --num-iters 5 --output-json results.json
    glmserve bench offline air-100m --engines glmserve transformers --quiet-wait 600 --retries 3
    glmserve bench offline --profile          # where glmserve's decode step time goes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

BENCH_CACHE = Path(os.environ.get("GLMSERVE_BENCH_CACHE", Path.home() / ".cache" / "glmserve-bench"))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory or named shape (default: glmserve serve's model)")
    p.add_argument("--model", dest="model_path", help="the same, as vLLM spells it")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    add_measurement_args(p, num_iters=3)
    p.add_argument("--engines", nargs="+", default=["glmserve"], choices=["glmserve", "glmserve-fp16", "transformers"],
                   help="add transformers, or glmserve with --weight-dtype float16, to compare (greedy outputs are "
                        "compared with the first engine's too)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16, float16 or float32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE, help="where named shapes are written")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement and the roofline")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test tensors")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile one glmserve run per batch size (torch.profiler + cProfile)")
    p.add_argument("--output-json", type=Path, help="write the results here")


def add_measurement_args(p: argparse.ArgumentParser, num_iters: int) -> None:
    """The workload and noise-control flags `measure_batch` reads (shared with benchmarks/compare_*.py)."""
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--num-iters", type=int, default=num_iters, help="repetitions per engine and batch size (medians)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random prompts")
    p.add_argument("--max-other-load", type=float, default=0.25,
                   help="a measurement during which other processes used more cores is disturbed (default 0.25)")
    p.add_argument("--retries", type=int, default=0, help="remeasurements of a disturbed measurement")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each measurement, wait up to this many seconds for other processes to go quiet")


def random_prompts(directory: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random plain token ids of the checkpoint's tokenizer."""
    from glmserve.bench.checkpoints import plain_token_ids

    rng = random.Random(seed)
    plain = plain_token_ids(directory)
    return [[rng.choice(plain) for _ in range(length)] for _ in range(count)]


def _timed(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    gc.collect()
    t0 = time.perf_counter()
    tokens = engine.generate(prompts, max_tokens)
    return time.perf_counter() - t0, tokens


def measure_batch(args, engines: list, prompts: list[list[int]]) -> dict:
    """Time every engine on one batch (`args`: num_iters, retries, max_other_load, quiet_wait, output_len,
    input_len), alternating their order; medians per engine, and each later engine compared with the first."""
    from glmserve.bench.engines import first_divergence
    from glmserve.bench.host import OtherLoad, wait_quiet

    b = len(prompts)
    for engine in engines:  # warm-up: first-call allocations, lazy inits
        engine.generate(prompts, 4)
    runs = {e.name: {"prefill_s": [], "total_s": [], "other_cores": [], "retries": 0, "discarded": []}
            for e in engines}
    tokens = {}
    for rep in range(args.num_iters):
        for engine in engines if rep % 2 == 0 else engines[::-1]:
            for attempt in range(args.retries + 1):
                # An engine working in other processes (a server, a peer's worker) names them in `pids`: their
                # CPU is the measured work, not noise (but another engine's idle server is noise).
                pids = getattr(engine, "pids", ())
                wait_quiet(args.max_other_load, args.quiet_wait, pids)
                load = OtherLoad(pids)  # over both runs: clock-tick resolution needs the longer window
                prefill, _ = _timed(engine, prompts, 1)
                total, out = _timed(engine, prompts, args.output_len)
                other = load.cores()
                if other <= args.max_other_load or attempt == args.retries:
                    break
                runs[engine.name]["discarded"].append({"prefill_s": prefill, "total_s": total, "other_cores": other})
                print(f"  batch {b:3d} {engine.name}: other processes used {other:.2f} cores: measuring again")
            r = runs[engine.name]
            r["prefill_s"].append(prefill)
            r["total_s"].append(total)
            r["other_cores"].append(other)
            r["retries"] += attempt
            if tokens.setdefault(engine.name, out) != out:
                print(f"  WARNING: {engine.name} greedy output changed between repetitions", file=sys.stderr)
            print(f"  batch {b:3d} rep {rep + 1}/{args.num_iters} {engine.name:12s} prefill {prefill * 1e3:8.1f} ms  "
                  f"total {total:7.2f} s  decode {b * (args.output_len - 1) / (total - prefill):8.1f} tok/s  "
                  f"(others: {other:.2f} cores)", flush=True)
    entry = {"batch": b}
    for name, r in runs.items():
        decode = [b * (args.output_len - 1) / (t - p) for p, t in zip(r["prefill_s"], r["total_s"])]
        contended = [o > args.max_other_load for o in r["other_cores"]]
        # Medians over the undisturbed measurements (all of them if none was).
        clean = [i for i, c in enumerate(contended) if not c] or list(range(len(contended)))
        prefill = statistics.median(r["prefill_s"][i] for i in clean)
        entry[name] = {**r, "decode_tps": decode, "contended": contended, "median_prefill_s": prefill,
                       "median_prefill_tps": b * args.input_len / prefill,
                       "median_decode_tps": statistics.median(decode[i] for i in clean),
                       "measurements_in_median": len(clean)}
    reference, *others = [e.name for e in engines]
    for name in others:  # each engine against the first (glmserve): decode ratio and greedy agreement
        g, t = tokens[reference], tokens[name]
        diverge = [first_divergence(x, y) for x, y in zip(g, t)]
        entry.setdefault("comparisons", {})[name] = {
            "greedy_mismatched_sequences": sum(d is not None for d in diverge),
            "greedy_mismatched_tokens": sum(x != y for gs, ts in zip(g, t) for x, y in zip(gs, ts)),
            "first_divergence": diverge,
            "ratio": entry[reference]["median_decode_tps"] / entry[name]["median_decode_tps"]}
    return entry


def _report(args, names: list[str], results: list[dict], bandwidth: dict | None, params: dict,
            bytes_per_param: int, other_cores: float) -> str:
    lines = ["", f"== {args.input_len}-token prompts, {args.output_len} new tokens, greedy, median of "
                 f"{args.num_iters} ==",
             "batch | engine       | prefill ms | prefill tok/s | decode tok/s | roofline tok/s | of roofline"]
    for entry in results:
        for n in names:
            e = entry[n]
            roof = e.get("roofline_tps", entry.get("roofline_tps"))
            lines.append(f"{entry['batch']:5d} | {n:12s} | {e['median_prefill_s'] * 1e3:10.1f} | "
                         f"{e['median_prefill_tps']:13.1f} | {e['median_decode_tps']:12.1f} | "
                         + (f"{roof:14.1f} | {e['median_decode_tps'] / roof:10.0%}" if roof else f"{'-':>14} | -"))
        for name, c in entry.get("comparisons", {}).items():
            lines.append(f"        {names[0]} / {name} decode: {c['ratio']:.2f}x; greedy mismatches "
                         f"{c['greedy_mismatched_sequences']}/{entry['batch']} sequences")
        disturbed = sum(sum(entry[n]["contended"]) for n in names)
        if any(all(entry[n]["contended"]) for n in names):
            lines.append("        (WARNING: every measurement of an engine was disturbed by other processes)")
        elif disturbed:
            lines.append(f"        ({disturbed} disturbed measurement(s) left out of the medians)")
    lines.append(f"other processes used {other_cores:.2f} of {os.cpu_count()} cores during the measurement")
    if bandwidth is not None:
        native_read = (f"native stream {bandwidth['native_read_GBps']:.1f} GB/s read, "
                       if "native_read_GBps" in bandwidth else "")
        lines += [f"bandwidth ({args.bandwidth_gib:g} GiB): sum {bandwidth['sum_read_GBps']:.1f} GB/s read, "
                  f"{native_read}GEMV {bandwidth['gemv_read_GBps']:.1f} GB/s read, copy "
                  f"{bandwidth['copy_read_write_GBps']:.1f} GB/s read+write",
                  f"roofline: weights read per step ({params['per_decode_token'] * bytes_per_param / 1e6:.1f} MB "
                  f"at batch 1; larger batches touch more routed experts) at {bandwidth['roofline_GBps']:.1f} GB/s"]
    return "\n".join(lines)


def main(args, parser: argparse.ArgumentParser) -> int:
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (decode time is a full run minus a max_tokens=1 run)")
    import torch

    from glmserve.bench.checkpoints import prepare_checkpoint
    from glmserve.bench.engines import GlmserveEngine, TransformersEngine, profile_glmserve
    from glmserve.bench.host import OtherLoad
    from glmserve.bench.roofline import GIB, measure_bandwidth, roofline_tps, weight_params
    from glmserve.config import ModelConfig
    from glmserve.engine.model_runner import resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model_path or args.model
    if model is None:
        from glmserve.cli import default_model_path

        model = default_model_path()
    directory = prepare_checkpoint(model, args.cache_dir)
    params = weight_params(directory)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, ModelConfig.from_pretrained(directory), device)
    if "transformers" in args.engines:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: measuring glmserve only", file=sys.stderr)
            args.engines = ["glmserve"]
    t0 = time.perf_counter()
    engines = [TransformersEngine(directory, dtype, device) if name == "transformers" else
               GlmserveEngine(directory, max(args.batch_size), args.input_len, args.output_len, args.dtype,
                              args.device, "float16" if name == "glmserve-fp16" else "auto")
               for name in args.engines]
    load_s = time.perf_counter() - t0
    bandwidth_size = int(args.bandwidth_gib * GIB)
    bandwidth_runs = [] if args.no_bandwidth else [measure_bandwidth(device, bandwidth_size)]

    all_prompts = random_prompts(directory, max(args.batch_size), args.input_len, args.seed)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"checkpoint {directory}\n  params {params['total'] / 1e6:.1f}M total, "
          f"{params['per_decode_token'] / 1e6:.1f}M read per batch-1 decode step ({dtype_name}); {device}, "
          f"{torch.get_num_threads()} threads; engines loaded in {load_s:.1f}s", flush=True)

    load = OtherLoad()
    results = [measure_batch(args, engines, all_prompts[:b]) for b in args.batch_size]
    other_cores = load.cores()
    bandwidth = None
    if not args.no_bandwidth:  # again after the engines ran; the host's bandwidth varies: keep the best of each
        bandwidth_runs.append(measure_bandwidth(device, bandwidth_size))
        bandwidth = {k: max(run[k] for run in bandwidth_runs) for k in bandwidth_runs[0]} | {"runs": bandwidth_runs}
        for entry in results:
            entry["roofline_tps"] = roofline_tps(params, entry["batch"], dtype.itemsize, bandwidth["roofline_GBps"])
            for engine in engines:  # fewer bytes per step for an engine that keeps weights in fp16
                if getattr(engine, "fp16_params", 0):
                    entry[engine.name]["roofline_tps"] = roofline_tps(params, entry["batch"], dtype.itemsize,
                                                                      bandwidth["roofline_GBps"], engine.fp16_params,
                                                                      engine.fp16_experts)
    print(_report(args, [e.name for e in engines], results, bandwidth, params, dtype.itemsize, other_cores))

    if args.output_json:
        _write_json(args, directory, params, engines, bandwidth, results, other_cores, dtype_name, device)
    if args.profile:
        glm = next((e for e in engines if e.name == "glmserve"), None)
        for b in args.batch_size if glm is not None else ():
            print(f"\n== profile: glmserve, batch {b}, {args.output_len} new tokens ==")
            print(profile_glmserve(glm, all_prompts[:b], args.output_len))
    return 0


def _write_json(args, directory: Path, params: dict, engines: list, bandwidth, results, other_cores,
                dtype_name: str, device) -> None:
    import tokenizers
    import torch

    from glmserve.bench.host import cpu_name, glmserve_revision, write_results

    versions = {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    transformers_engine = next((e for e in engines if e.name == "transformers"), None)
    if transformers_engine is not None:
        import transformers

        versions["transformers"] = transformers.__version__
    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(device)},
        "versions": versions, "glmserve_revision": glmserve_revision(),
        "checkpoint": {"path": str(directory), "config": json.loads((directory / "config.json").read_text()),
                       "params": params},
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                     "num_iters": args.num_iters, "prompt_seed": args.seed, "dtype": dtype_name,
                     "glmserve_prefix_caching": False},
        "transformers_impl": transformers_engine.implementation if transformers_engine else None,
        "other_processes_cores": other_cores, "bandwidth": bandwidth, "results": results,
    }
    write_results(args.output_json, report)
    print(f"wrote {args.output_json}")
