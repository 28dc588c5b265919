#!/usr/bin/env python
"""One 131,072-token request end to end through the engine (chunked prefill, then decode) on a small random
checkpoint with GLM-4.5-Air's structure and max_position_embeddings 131072: its time to first token, prefill
tokens/s and decode tokens/s, per KV-cache dtype and attention backend, with the KV pool's size and the process's
peak memory.

--shape picks the attention heads: air-tiny (the test suite's Air shape: 8 query / 2 KV heads of 16), air-gqa12
(Air's head layout divided by 8: 12 query heads sharing 1 KV head of 128, Air's GQA ratio and head size) or
air-heads (Air's own 96 query / 8 KV heads of 128; a 128K prefill of it is hours on 2 cores). The rest of the model
is tiny (hidden 64, one dense layer then MoE layers), so the time is attention's. --shape bench-57m is the
benchmark shape (random weights, max_position_embeddings 131072) that compare_llamacpp.py --context measures.

The script may run paused from outside (yield_to_benchmarks.sh stops it with SIGSTOP while others benchmark): every
time is given as wall-clock, as active time (wall-clock less the pauses, see glmserve.bench.pauses) and as the
process's CPU time; the tokens/s figures use the active time.

Examples:
    python benchmarks/long_request.py --shape air-gqa12 --output-json benchmarks/results/long-request-air-gqa12.json
    python benchmarks/long_request.py --total-tokens 16384 --kv-cache-dtypes fp8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmserve.bench.checkpoints import SHAPES as BENCH_SHAPES
from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.host import cpu_name, glmserve_revision, write_results
from glmserve.bench.offline import BENCH_CACHE
from glmserve.bench.pauses import Clock, PauseMeter
from glmserve.config import EngineConfig
from glmserve.engine.kv_planning import kv_bytes_per_token
from glmserve.engine.llm_engine import LLMEngine
from glmserve.testing.checkpoint import GLM45_AIR, write_random_checkpoint
from glmserve.types import SamplingParams

AIR_TINY = replace(GLM45_AIR, max_position_embeddings=131072, num_nextn_predict_layers=0)
SHAPES = {
    "air-tiny": AIR_TINY,
    "air-gqa12": replace(AIR_TINY, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=1, head_dim=128),
    "air-heads": replace(AIR_TINY, num_hidden_layers=2, num_attention_heads=96, num_key_value_heads=8, head_dim=128),
    # compare_llamacpp.py --context's checkpoint: the 32K chunked prefill of the long-context table
    "bench-57m": replace(BENCH_SHAPES["bench-57m"], max_position_embeddings=131072),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", default="air-tiny", choices=list(SHAPES))
    p.add_argument("--total-tokens", type=int, default=131072, help="prompt + output tokens")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8"])
    p.add_argument("--kv-cache-memory-gb", type=float, help="default: what the request needs, plus 64 blocks")
    p.add_argument("--attention-backend", default=None, help="default: the engine's")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--output-json", type=Path, help="rewritten after each KV-cache dtype's run")
    return p.parse_args(argv)


def summary(steps: list[dict], tokens: int, threads: int) -> dict:
    """tokens_per_s: over the active time (slowed by other processes too, where they share the cores);
    tokens_per_s_by_cpu: over the CPU time spread on `threads` cores, what the run would take with them to itself
    if none of its CPU time were spent waiting (an upper bound)."""
    total = {key: sum(s[key] for s in steps) for key in ("wall_s", "paused_s", "active_s", "cpu_s")}
    return {"steps": len(steps), "tokens": tokens, **total,
            "tokens_per_s": tokens / total["active_s"] if tokens else None,
            "tokens_per_wall_s": tokens / total["wall_s"] if tokens else None,
            "tokens_per_s_by_cpu": tokens * threads / total["cpu_s"] if tokens and total["cpu_s"] else None}


def pool_gb(shape, kv_dtype: str, total_tokens: int) -> float:
    """A KV pool that holds one request of total_tokens (and 64 blocks of 16 more): its memory is the request's."""
    itemsize = 4 if kv_dtype == "auto" else 1  # fp32 compute on CPU, or one byte per value
    per_token = kv_bytes_per_token(shape.num_hidden_layers, shape.num_key_value_heads, shape.head_dim, itemsize)
    return (total_tokens + 64 * 16) * per_token / 2**30


def run_once(directory: Path, args: argparse.Namespace, kv_dtype: str, meter: PauseMeter) -> dict:
    memory_gb = args.kv_cache_memory_gb or pool_gb(SHAPES[args.shape], kv_dtype, args.total_tokens)
    engine = LLMEngine(EngineConfig(model=str(directory), kv_cache_dtype=kv_dtype,
                                    kv_cache_memory_gb=memory_gb, max_model_len=args.total_tokens,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    attention_backend=args.attention_backend), progress=False)
    # Untimed warm-up: the native extension's load (or build) and first-call allocations; another prompt, so that
    # the prefix cache cannot serve the timed request.
    engine.add_request("warm-up", [1] * 64, SamplingParams(temperature=0.0, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    prompt_len = args.total_tokens - args.output_tokens
    prompt = torch.randint(1, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=args.output_tokens,
                                                      ignore_eos=True))
    prefill, decode, generated = [], [], 0
    while engine.has_unfinished_requests():
        start = Clock(meter)
        new = sum(len(out.new_token_ids) for out in engine.step())
        step = Clock(meter).since(start)
        (decode if generated else prefill).append(step)  # the step that yields the first token ends the prefill
        generated += new
        if (len(prefill) + len(decode)) % 8 == 0:
            print(f"  {kv_dtype}: step {len(prefill) + len(decode)}, {generated} generated, "
                  f"{step['active_s']:.1f} s active ({step['paused_s']:.1f} s paused)", file=sys.stderr, flush=True)
    spec = engine.kv_spec
    prefill_s, decode_s = summary(prefill, prompt_len, args.threads), summary(decode, generated - 1, args.threads)
    return {"kv_cache_dtype": spec.dtype, "attention_backend": engine.runner.attn_backend.name,
            "kv_pool_tokens": spec.num_tokens, "kv_pool_bytes": spec.num_tokens * spec.bytes_per_token,
            "kv_bytes_per_token": spec.bytes_per_token, "kv_bytes_of_request": args.total_tokens * spec.bytes_per_token,
            "prompt_tokens": prompt_len, "output_tokens": generated,
            "time_to_first_token_active_s": prefill_s["active_s"], "prefill_tokens_per_s": prefill_s["tokens_per_s"],
            "decode_tokens_per_s": decode_s["tokens_per_s"], "prefill": prefill_s, "decode": decode_s,
            "prefill_step_active_s": [round(s["active_s"], 3) for s in prefill],
            "decode_step_active_s": [round(s["active_s"], 4) for s in decode],
            "peak_rss_mib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    if args.shape in BENCH_SHAPES:
        directory = prepare_checkpoint(args.shape, args.cache_dir, shape.max_position_embeddings)
    else:
        directory = args.cache_dir / f"{args.shape}-{shape.max_position_embeddings}"
        if not (directory / "model.safetensors").is_file():
            write_random_checkpoint(directory, shape, seed=0, config_style="5")
    meter = PauseMeter()
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "host": cpu_name(),
               "glmserve_revision": glmserve_revision(), "load_average_at_start": os.getloadavg(),
               "shape_name": args.shape, "shape": shape.__dict__,
               "timing": "active_s = wall_s - paused_s (the process stopped by SIGSTOP); tokens/s use active_s",
               "runs": []}
    for kv_dtype in args.kv_cache_dtypes:
        run = run_once(directory, args, kv_dtype, meter)
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if not k.endswith("step_active_s")}), flush=True)
        results["load_average_at_end"] = os.getloadavg()  # other processes sharing the cores, 1/5/15-minute means
        if args.output_json:
            write_results(args.output_json, results)
    meter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
