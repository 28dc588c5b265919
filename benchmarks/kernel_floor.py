#!/usr/bin/env python
"""How fast glmserve's decode could be with the matrix kernels torch has on this CPU: each batch size's "GEMM
floor" (one decode step's matrix products alone: the same modules, weights, kernels and call order as a real
step, with every other op taken away) beside the real step of the same engine; and the weight-only kernels torch
offers for the largest weight (the lm_head), fp32, fbgemm fp16 and aten's 8-bit one.

A floor above a target's step time means that no work outside the matrix products (dispatch, attention,
sampling, the scheduler) can reach that target with these kernels.

Examples:
    python benchmarks/kernel_floor.py bench-57m --output-json benchmarks/results/kernel-floor-bench-57m.json
    python benchmarks/kernel_floor.py bench-57m --threads 1 --batch-size 1 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.engines import GlmserveEngine
from glmserve.bench.host import call_times
from glmserve.bench.offline import BENCH_CACHE, random_prompts

PROMPT_LEN, NEW_TOKENS = 128, 64  # the real step: 128-token random prompts (prefix caching off), 64 decode steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="checkpoint directory or named shape (bench-57m, air-100m)")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE, help="where named shapes are written")
    p.add_argument("--weight-dtype", default="float16", choices=["auto", "float16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--repeats", type=int, default=60, help="GEMM-only steps timed per batch size (median)")
    p.add_argument("--real-runs", type=int, default=3, help="real 64-token decodes timed per batch size (median)")
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def gemm_step(model, batch: int, routing: torch.Generator) -> None:
    """One decode step's matrix products in the model's order; experts get the row counts of random top-k
    routing (what a random-weight checkpoint's router gives)."""
    cfg = model.config
    x = torch.randn(batch, cfg.hidden_size)
    attn_out = torch.randn(batch, cfg.num_attention_heads * cfg.head_dim)
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        layer.self_attn.qkv_proj(x)
        layer.self_attn.o_proj(attn_out)
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            mlp(x)
            continue
        F.linear(x, mlp.gate.weight)
        ids = torch.rand(batch, cfg.n_routed_experts, generator=routing).topk(cfg.num_experts_per_tok).indices
        for expert, rows in enumerate(torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts).tolist()):
            if rows:
                mlp.experts.quant_method.expert(mlp.experts, x[:1].expand(rows, -1).contiguous(), expert)
        mlp.shared_experts(x)
    model.lm_head(x)


def real_step_ms(engine, prompts: list[list[int]], new_tokens: int = 64) -> float:
    """The engine's decode step: (a run of new_tokens + 1 tokens - a 1-token run) / new_tokens."""
    def run(max_tokens: int) -> float:
        start = time.perf_counter()
        engine.generate(prompts, max_tokens)
        return time.perf_counter() - start

    return (run(new_tokens + 1) - run(1)) / new_tokens * 1e3


def timed_us(fn, repeats: int = 30) -> float:
    for _ in range(2):  # with call_times' own, three warm-up calls
        fn()
    return statistics.median(call_times(fn, repeats)) * 1e6


def lm_head_kernels(vocab: int, hidden: int, batches: list[int]) -> list[dict]:
    """The weight-only kernels for a [vocab, hidden] weight: fp32 (MKL), fbgemm fp16 (what --weight-dtype float16
    uses), and aten's int8 weight x per-row scale kernel, with fp32 and with bf16 activations."""
    weight = torch.randn(vocab, hidden) * 0.02
    scale = weight.abs().amax(1) / 127
    int8 = torch.round(weight / scale[:, None]).to(torch.int8)
    fp16 = torch.ops.quantized.linear_prepack_fp16(weight, None)
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden)
        xb, scale_b = x.bfloat16(), scale.bfloat16()
        rows.append({"batch": batch,
                     "fp32_us": timed_us(lambda: F.linear(x, weight)),
                     "fp16_fbgemm_us": timed_us(lambda: torch.ops.quantized.linear_dynamic_fp16(x, fp16)),
                     "int8_fp32_activations_us": timed_us(lambda: torch.ops.aten._weight_int8pack_mm(x, int8, scale)),
                     "int8_bf16_activations_us": timed_us(
                         lambda: torch.ops.aten._weight_int8pack_mm(xb, int8, scale_b))})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = prepare_checkpoint(args.model, args.cache_dir)
    engine = GlmserveEngine(directory, max(args.batch_size), PROMPT_LEN, NEW_TOKENS + 1, "auto", "cpu",
                            args.weight_dtype)
    model = engine.llm.engine.runner.model
    steps = []
    print(f"{args.model}, --weight-dtype {args.weight_dtype}, {args.threads} threads")
    print("batch | GEMM floor ms | at most tok/s | real step ms | real tok/s | GEMM share")
    with torch.inference_mode():
        for batch in args.batch_size:
            routing = torch.Generator().manual_seed(0)
            floor = timed_us(lambda: gemm_step(model, batch, routing), args.repeats) / 1e3
            prompts = random_prompts(directory, batch, PROMPT_LEN, seed=batch)
            engine.generate(prompts, 2)  # warm-up
            real = statistics.median(real_step_ms(engine, prompts, NEW_TOKENS) for _ in range(args.real_runs))
            steps.append({"batch": batch, "gemm_floor_ms": floor, "real_step_ms": real})
            print(f"{batch:5d} | {floor:13.2f} | {batch / floor * 1e3:13.1f} | {real:12.2f} | "
                  f"{batch / real * 1e3:10.1f} | {floor / real:10.0%}", flush=True)
        kernels = lm_head_kernels(model.config.vocab_size, model.config.hidden_size, args.batch_size)
    print(f"\nlm_head [{model.config.vocab_size}, {model.config.hidden_size}], median us per call")
    print("batch | fp32 | fp16 fbgemm | int8 (fp32 act.) | int8 (bf16 act.)")
    for k in kernels:
        print(f"{k['batch']:5d} | {k['fp32_us']:6.0f} | {k['fp16_fbgemm_us']:11.0f} | "
              f"{k['int8_fp32_activations_us']:16.0f} | {k['int8_bf16_activations_us']:16.0f}")
    if args.output_json:
        args.output_json.write_text(json.dumps(
            {"model": args.model, "weight_dtype": args.weight_dtype, "threads": args.threads,
             "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "steps": steps, "lm_head_kernels": kernels}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
