#!/usr/bin/env python
"""MTP speculative decoding: decode tokens/s with and without drafts, batch 1 and batch 8, k = 1, 2, 3, one run.

The workload is the model's own kind of traffic: held-out conversations of the nano corpus (arithmetic with and
without thinking, tool calls, answers from tool results, chat), rendered with the chat template, greedy, each
answer running to its stop token (max 160 tokens). Every configuration generates the same tokens (checked), so
the comparison is of time only. For each configuration and repetition: a `max_tokens=1` run times prefill plus
the first token, a full run times everything; decode tokens/s = (tokens - first tokens) / (full - prefill).
Configurations alternate within each repetition, so machine noise hits all of them; medians are reported.

Examples:
    python benchmarks/spec_decode.py                                  # the embedded model, 3 reps
    python benchmarks/spec_decode.py --model DIR --reps 5 --json benchmarks/results/spec-decode-nano.json
    python benchmarks/spec_decode.py --lora ADAPTER_DIR --batch 8      # acceptance with an adapter, base drafts
    python benchmarks/spec_decode.py --quantization int8 --batch 1 --k 1 3   # weights held as int8
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import torch

from glmserve.config import QUANTIZATION_METHODS, EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.nano.corpus import conversations
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import SamplingParams


def heldout_prompts(tokenizer: Tokenizer, count: int, seed: int = 7) -> list[list[int]]:
    prompts, stream = [], conversations(seed, "heldout")
    while len(prompts) < count:
        for example in next(stream):
            if len(prompts) < count:
                prompts.append(tokenizer.encode(example.prompt))
    return prompts


def generate(engine: LLMEngine, prompts: list[list[int]], batch: int, max_tokens: int) -> list[list[int]]:
    """All prompts, `batch` at a time (each group runs to completion before the next starts), with the engine's
    LoRA adapter if it has one loaded (--lora)."""
    adapters = list(engine.loras.adapters.values()) if engine.config.enable_lora else []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, lora_request=adapters[0] if adapters else None)
    outputs: dict[str, list[int]] = {}
    for start in range(0, len(prompts), batch):
        for i, prompt in enumerate(prompts[start : start + batch], start=start):
            outputs[str(i)] = []
            engine.add_request(f"{i}-{time.monotonic_ns()}", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[out.request_id.split("-")[0]].extend(out.new_token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


def timed(engine: LLMEngine, prompts, batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    gc.collect()
    t0 = time.perf_counter()
    tokens = generate(engine, prompts, batch, max_tokens)
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="draft tokens per step")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--lora", help="a LoRA adapter every request runs with (drafts still come from the base model's "
                   "MTP layer): how acceptance changes under an adapter")
    p.add_argument("--quantization", choices=tuple(QUANTIZATION_METHODS), help="weights held quantized (every "
                   "configuration, the MTP layer's too)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from glmserve.cli import default_model_path

        args.model = default_model_path()

    tokenizer = Tokenizer(args.model)
    prompts = heldout_prompts(tokenizer, args.prompts)
    configs = [0, *args.k]
    engines = {k: LLMEngine(EngineConfig(model=args.model, num_speculative_tokens=k, enable_prefix_caching=False,
                                         max_num_seqs=max(args.batch), num_kv_blocks=512,
                                         enable_lora=args.lora is not None, max_lora_rank=64,
                                         quantization=args.quantization), progress=False)
               for k in configs}
    if args.lora:
        for engine in engines.values():
            engine.add_lora("adapter", args.lora)
    from glmserve.bench.host import OtherLoad

    results, load = [], OtherLoad()  # other processes' CPU during the measurements: 0 on a quiet machine
    for batch in args.batch:
        times: dict[int, list[float]] = {k: [] for k in configs}
        reference, stats = None, {}
        for rep in range(args.reps):
            order = configs if rep % 2 == 0 else configs[::-1]
            for k in order:
                engine = engines[k]
                prefill, _ = timed(engine, prompts, batch, 1)
                before = engine.scheduler.stats().spec_decoding
                total, tokens = timed(engine, prompts, batch, args.max_tokens)
                after = engine.scheduler.stats().spec_decoding
                if reference is None:
                    reference = tokens
                if tokens != reference:
                    raise RuntimeError(f"k={k}, batch {batch}: greedy tokens differ from the other configurations")
                num_tokens = sum(len(t) for t in tokens)
                times[k].append((num_tokens - len(tokens)) / (total - prefill))
                if after is not None:
                    drafts = after.num_drafts - before.num_drafts
                    accepted = after.num_accepted_tokens - before.num_accepted_tokens
                    per_position = [a - (before.accepted_per_position[j] if j < len(before.accepted_per_position)
                                         else 0) for j, a in enumerate(after.accepted_per_position)]
                    stats[k] = {"mean_acceptance_length": round(1 + accepted / drafts, 3),
                                "per_position_acceptance": [round(n / drafts, 3) for n in per_position]}
        base = statistics.median(times[0])
        for k in configs:
            median = statistics.median(times[k])
            row = {"batch": batch, "k": k, "decode_tokens_per_s": round(median, 1),
                   "runs": [round(t, 1) for t in times[k]], "speedup": round(median / base, 3), **stats.get(k, {})}
            results.append(row)
            extra = (f"  acceptance length {row['mean_acceptance_length']:.2f}  per position "
                     f"{row['per_position_acceptance']}" if k else "")
            print(f"batch {batch:2d}  k={k}  {median:7.1f} tok/s  x{median / base:.2f}{extra}", flush=True)
        print(f"batch {batch}: {sum(len(t) for t in reference)} tokens over {len(prompts)} prompts; other processes "
              f"used {load.cores():.2f} cores so far", flush=True)

    if args.json:
        from glmserve.bench.host import cpu_name, glmserve_revision
        from glmserve.kernels.native import default_isa

        record = {"model": args.model, "lora": args.lora, "quantization": args.quantization, "prompts": len(prompts),
                  "max_tokens": args.max_tokens, "reps": args.reps, "threads": args.threads, "torch": torch.__version__,
                  "machine": platform.machine(), "processor": cpu_name(), "kernel_isa": default_isa(),
                  "other_processes_cores": round(load.cores(), 2),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "glmserve_revision": glmserve_revision(),
                  "results": results}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
