#!/usr/bin/env python
"""One 131,072-token request end to end through the engine (chunked prefill, then decode) on a small random
checkpoint with GLM-4.5-Air's structure and max_position_embeddings 131072: its time to first token, prefill
tokens/s and decode tokens/s, per KV-cache dtype and attention backend.

Examples:
    python benchmarks/long_request.py --output-json benchmarks/results/long-request-air-tiny.json
    python benchmarks/long_request.py --total-tokens 16384 --kv-cache-dtypes fp8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmserve.bench.offline import BENCH_CACHE
from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.testing.checkpoint import GLM45_AIR, write_random_checkpoint
from glmserve.types import SamplingParams

AIR_TINY = replace(GLM45_AIR, max_position_embeddings=131072, num_nextn_predict_layers=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--total-tokens", type=int, default=131072, help="prompt + output tokens")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8"])
    p.add_argument("--attention-backend", default=None, help="default: the engine's")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def run_once(directory: Path, args: argparse.Namespace, kv_dtype: str) -> dict:
    engine = LLMEngine(EngineConfig(model=str(directory), kv_cache_dtype=kv_dtype, kv_cache_memory_gb=2.0,
                                    max_model_len=args.total_tokens, max_num_batched_tokens=args.max_num_batched_tokens,
                                    attention_backend=args.attention_backend), progress=False)
    prompt_len = args.total_tokens - args.output_tokens
    prompt = torch.randint(1, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=args.output_tokens,
                                                      ignore_eos=True))
    start = time.perf_counter()
    first = None
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids and first is None:
                first = time.perf_counter()
            generated += len(out.new_token_ids)
    end = time.perf_counter()
    spec = engine.kv_spec
    return {"kv_cache_dtype": spec.dtype, "kv_pool_tokens": spec.num_tokens, "kv_bytes_per_token": spec.bytes_per_token,
            "prompt_tokens": prompt_len, "output_tokens": generated, "time_to_first_token_s": first - start,
            "prefill_tokens_per_s": prompt_len / (first - start),
            "decode_tokens_per_s": (generated - 1) / (end - first) if generated > 1 else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = args.cache_dir / "air-tiny-131072"
    if not (directory / "model.safetensors").is_file():
        write_random_checkpoint(directory, AIR_TINY, seed=0, config_style="5")
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "threads": args.threads,
               "host": platform.processor() or platform.machine(),
               "load_average_at_start": os.getloadavg(), "shape": AIR_TINY.__dict__, "runs": []}
    for kv_dtype in args.kv_cache_dtypes:
        run = run_once(directory, args, kv_dtype)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results["load_average_at_end"] = os.getloadavg()  # other processes sharing the cores, 1/5/15-minute means
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
