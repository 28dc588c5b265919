#!/usr/bin/env python
"""Long-context decode and chunked prefill, per attention backend and KV-cache dtype, on a random-weight shape
with max_position_embeddings raised to 131072 (bench-57m's by default).

For each context length: one attention layer's decode (the backend alone, over each layer's cache in turn, as a
step reads them, divided by the layers), and a whole decode step of the model
(batch 1, and batch 16 at the lengths given with --batch16-contexts), beside its roofline: the weights one step
reads plus the KV cache it reads, over the measured memory bandwidth. Then one 2048-token prefill chunk at the end
of a --prefill-context-token context. The caches are filled with random keys and values instead of a real prefill
(attention's cost does not depend on their values), so a 128K context costs no 128K prefill. On the CPU the KV
pool lies on huge pages; GLMSERVE_KV_HUGE_PAGES=0 puts it on torch's 4 KiB pages, to compare.

Examples:
    python benchmarks/long_context.py --output-json benchmarks/results/long-context-bench-57m.json
    python benchmarks/long_context.py --contexts 4096 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmserve.bench.checkpoints import SHAPES
from glmserve.bench.host import OtherLoad, call_times, cpu_name, glmserve_revision, write_results
from glmserve.bench.offline import BENCH_CACHE
from glmserve.bench.roofline import count_weight_params, measure_bandwidth, params_per_decode_step
from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import ATTENTION_BACKENDS, AttentionMetadata, get_attention_backend
from glmserve.testing.checkpoint import config_dict

MAX_POSITIONS = 131072
PREFILL_CHUNK = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", default="bench-57m", choices=list(SHAPES))
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--batch16-contexts", type=int, nargs="*", default=[4096])
    p.add_argument("--prefill-context", type=int, default=32768, help="0: no prefill chunk")
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8"])
    p.add_argument("--backends", nargs="+", default=list(ATTENTION_BACKENDS))
    p.add_argument("--repeats", type=int, default=5, help="timed decode steps per case (the fastest is kept)")
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def config_dir(shape: str, cache_dir: Path) -> Path:
    """config.json alone (the weights are random, --load-format dummy) with max_position_embeddings 131072."""
    directory = cache_dir / f"{shape}-{MAX_POSITIONS}"
    directory.mkdir(parents=True, exist_ok=True)
    config = config_dict(replace(SHAPES[shape], max_position_embeddings=MAX_POSITIONS), [0], 0, style="5")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def fill_caches(runner: ModelRunner, gen: torch.Generator) -> None:
    for layer in runner.model.attention_layers:
        for cache in (layer.kv_cache.k, layer.kv_cache.v):
            for rows in cache.split(65536):
                rows.copy_(torch.randn(rows.shape, generator=gen).to(rows.dtype))


def tables_for(batch: int, context: int, num_blocks: int, block_size: int, rng: random.Random) -> list[list[int]]:
    """Each sequence's blocks at random places in the pool (a pool after some churn)."""
    need = -(-context // block_size)
    pool = rng.sample(range(num_blocks), batch * need)
    return [pool[i * need : (i + 1) * need] for i in range(batch)]


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats`: what the hardware does when no other process competes (the machine is shared)."""
    return min(call_times(fn, repeats))


@torch.inference_mode()
def decode_case(runner: ModelRunner, backend, batch: int, context: int, repeats: int, rng: random.Random) -> dict:
    """One decode step at `context` tokens per sequence (the new token is the context's last)."""
    tables = tables_for(batch, context, runner.num_blocks, runner.block_size, rng)
    starts = [context - 1] * batch
    ids = torch.randint(0, 1000, (batch,))
    positions = torch.tensor(starts)

    def step():
        meta = AttentionMetadata.build(starts, [1] * batch, tables, runner.block_size, runner.device, backend)
        runner.model.compute_logits(runner.model(ids, positions, meta))

    layer = runner.model.attention_layers[0]
    q = torch.randn(batch, layer.num_heads, layer.head_dim)
    k = torch.randn(batch, layer.num_kv_heads, layer.head_dim)

    layers = runner.model.attention_layers

    def attention():  # every layer's cache in turn, so that its keys come from memory as in a step
        meta = AttentionMetadata.build(starts, [1] * batch, tables, runner.block_size, runner.device, backend)
        for each in layers:
            backend.forward(q, k, k, each.kv_cache, meta, layer.scale)

    steps = call_times(step, repeats)
    return {"step_s": min(steps), "step_s_median": statistics.median(steps),
            "attention_layer_s": best_time(attention, repeats) / len(layers)}


@torch.inference_mode()
def prefill_case(runner: ModelRunner, backend, context: int, rng: random.Random) -> dict:
    """The last 2048-token chunk of a `context`-token prompt (the chunks before it are in the cache)."""
    tables = tables_for(1, context, runner.num_blocks, runner.block_size, rng)
    start = context - PREFILL_CHUNK
    ids = torch.randint(0, 1000, (PREFILL_CHUNK,))
    positions = torch.arange(start, context)

    def chunk():
        meta = AttentionMetadata.build([start], [PREFILL_CHUNK], tables, runner.block_size, runner.device, backend)
        hidden = runner.model(ids, positions, meta)
        runner.model.compute_logits(hidden[-1:])

    seconds = best_time(chunk, 2)
    return {"chunk_s": seconds, "tokens_per_s": PREFILL_CHUNK / seconds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = config_dir(args.shape, args.cache_dir)
    model_config = ModelConfig.from_pretrained(directory)
    longest = max(args.contexts + [16 * c for c in args.batch16_contexts] + [args.prefill_context])
    bandwidth = measure_bandwidth(torch.device("cpu"))
    other = OtherLoad()
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "shape": args.shape,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
               "host": cpu_name() or platform.machine(), "glmserve_revision": glmserve_revision(),
               "load_average_at_start": os.getloadavg(),
               "bandwidth": bandwidth, "cases": []}
    rng = random.Random(0)
    for kv_dtype in args.kv_cache_dtypes:
        block_size = 16
        runner = ModelRunner(model_config, EngineConfig(model=str(directory), load_format="dummy",
                                                        num_kv_blocks=-(-longest // block_size) + 64,
                                                        kv_cache_dtype=kv_dtype), progress=False)
        fill_caches(runner, torch.Generator().manual_seed(0))
        params = count_weight_params(json.loads((directory / "config.json").read_text()),
                                     ((n, p.numel()) for n, p in runner.model.named_parameters()))
        per_token_kv = runner.kv_spec.bytes_per_token
        cases = [(1, c) for c in args.contexts] + [(16, c) for c in args.batch16_contexts]
        for name in args.backends:
            backend = get_attention_backend(name)
            for batch, context in cases:
                timing = decode_case(runner, backend, batch, context, args.repeats, rng)
                step_bytes = params_per_decode_step(params, batch) * 4 + batch * context * per_token_kv
                roofline_s = step_bytes / (bandwidth["roofline_GBps"] * 1e9)
                case = {"kind": "decode", "backend": name, "kv_cache_dtype": runner.kv_spec.dtype, "batch": batch,
                        "context": context, **timing, "tokens_per_s": batch / timing["step_s"],
                        "kv_bytes_read": batch * context * per_token_kv, "roofline_step_s": roofline_s,
                        "fraction_of_roofline": roofline_s / timing["step_s"]}
                results["cases"].append(case)
                print(json.dumps(case), flush=True)
            if not args.prefill_context:
                continue
            case = {"kind": "prefill_chunk", "backend": name, "kv_cache_dtype": runner.kv_spec.dtype,
                    "context": args.prefill_context, "chunk": PREFILL_CHUNK,
                    **prefill_case(runner, backend, args.prefill_context, rng)}
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
        del runner
    results["load_average_at_end"] = os.getloadavg()  # other processes sharing the cores, 1/5/15-minute means
    results["other_processes_cores"] = other.cores()  # their mean CPU use over the run: 0 on a quiet machine
    if args.output_json:
        write_results(args.output_json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
