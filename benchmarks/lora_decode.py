#!/usr/bin/env python
"""LoRA serving: decode tokens/s at 16 concurrent streams with 0, 1 and 4 distinct adapters in the batch.

Configurations on one random checkpoint (bench-57m by default) and random rank-16 adapters:
- base: the engine without --enable-lora;
- lora-0: --enable-lora --max-loras 4, every stream on the base model (the cost of having LoRA on);
- lora-1: every stream on one adapter;
- lora-4: four adapters, four streams each, mixed in every step.
Each run: 16 prompts of 32 random tokens, greedy, 64 new tokens each (ignore_eos); decode tokens/s counts the
tokens of the steps after every stream has its first token, over those steps' wall time, and over this
process's CPU time (which other processes' load moves less). Configurations alternate within each repetition, so
machine noise hits all of them; medians are reported.

Examples:
    python benchmarks/lora_decode.py --json benchmarks/results/lora-decode-bench-57m.json
    python benchmarks/lora_decode.py --targets attn mlp experts     # the routed experts too
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glmserve.bench.checkpoints import SHAPES, prepare_checkpoint
from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.testing.lora import TARGETS, write_random_adapter
from glmserve.types import SamplingParams

STREAMS, PROMPT_LEN = 16, 32


def decode_rate(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None],
                max_tokens: int) -> tuple[float, float]:
    """(decode tokens per wall second, per CPU second of this process: less moved by other processes' load)."""
    for i, (prompt, name) in enumerate(zip(prompts, adapters)):
        lora = None if name is None else engine.loras.adapters[name]
        engine.add_request(f"{i}-{time.monotonic_ns()}", prompt, SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, lora_request=lora))
    started: set[str] = set()
    gc.collect()
    t0, cpu0, tokens = None, None, 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if t0 is not None:
            tokens += sum(len(o.new_token_ids) for o in outputs)
        started |= {o.request_id for o in outputs}
        if t0 is None and len(started) == len(prompts):
            t0, cpu0 = time.perf_counter(), time.process_time()
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - cpu0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default="bench-57m", help="a named bench shape or a checkpoint directory")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "glmserve-bench"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["attn", "mlp"], choices=sorted(TARGETS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = prepare_checkpoint(args.model, Path(args.cache_dir))
    shape = SHAPES[args.model]
    adapter_dir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    modules = []
    for i in range(4):
        write_random_adapter(adapter_dir / f"a{i}", shape, args.rank, tuple(args.targets), seed=i)
        modules.append((f"a{i}", str(adapter_dir / f"a{i}")))
    common = dict(model=str(directory), max_num_seqs=STREAMS, kv_cache_memory_gb=0.25)
    engines = {"base": LLMEngine(EngineConfig(**common), progress=False),
               "lora": LLMEngine(EngineConfig(**common, enable_lora=True, max_loras=4, max_lora_rank=args.rank,
                                              lora_modules=tuple(modules)), progress=False)}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, shape.vocab_size - 10, (PROMPT_LEN,), generator=gen).tolist()
               for _ in range(STREAMS)]
    configs = {"base": ("base", [None] * STREAMS), "lora-0": ("lora", [None] * STREAMS),
               "lora-1": ("lora", ["a0"] * STREAMS), "lora-4": ("lora", [f"a{i % 4}" for i in range(STREAMS)])}
    for name, (engine, adapters) in configs.items():  # warm-up
        decode_rate(engines[engine], prompts, adapters, 8)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.reps):
        for name, (engine, adapters) in configs.items():
            wall, cpu = decode_rate(engines[engine], prompts, adapters, args.max_tokens)
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    cpu_medians = {name: statistics.median(r) for name, r in cpu_rates.items()}
    for name, rate in medians.items():
        cpu = cpu_medians[name]
        print(f"{name:7s} {rate:8.1f} decode tok/s  ({rate / medians['base']:.2f} x base)   {cpu:8.1f} tok per CPU s "
              f"({cpu / cpu_medians['base']:.2f} x base)")
    if args.json:
        result = {"benchmark": "lora_decode", "model": args.model, "streams": STREAMS, "prompt_len": PROMPT_LEN,
                  "max_tokens": args.max_tokens, "rank": args.rank, "targets": args.targets, "reps": args.reps,
                  "threads": args.threads, "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "decode_tok_s_median": medians, "decode_tok_s_runs": rates,
                  "relative_to_base": {n: r / medians["base"] for n, r in medians.items()},
                  "decode_tok_per_cpu_s_median": cpu_medians, "decode_tok_per_cpu_s_runs": cpu_rates,
                  "cpu_relative_to_base": {n: r / cpu_medians["base"] for n, r in cpu_medians.items()}}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
