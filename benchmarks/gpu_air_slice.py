#!/usr/bin/env python
"""Decode step time of a GLM-4.5-Air-shaped slice against the memory-bandwidth roofline, for a GPU session
(issue 6): Air's true hidden size, heads, experts and vocabulary, a few layers (layer 0 dense, the rest MoE),
random weights (`--load-format dummy`: nothing is written or read from disk), bf16 on CUDA.

For each batch size: b random prompts, greedy, EOS ignored; the decode step time is the time after the prefill
step to the end of the run / (new tokens - 1), median of --num-iters; the roofline step time is the weights that
step reads (everything but the routed experts once, and the experts b tokens pick in expectation) at the device's
measured read bandwidth.

    python benchmarks/gpu_air_slice.py --output-json $OUT/air-slice.json            # on the GPU machine
    python benchmarks/gpu_air_slice.py --device cpu --dtype float32 --hidden-size 256 --n-routed-experts 8 \\
        --moe-intermediate-size 64 --intermediate-size 512 --vocab-size 4096 --batch-size 1 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmserve.bench.roofline import GIB, count_weight_params, measure_bandwidth, roofline_tps
from glmserve.testing.checkpoint import TinyShape, config_dict

AIR = TinyShape(  # ../shared/reference/GLM45.md §5.1, GLM-4.5-Air
    hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96, num_key_value_heads=8,
    head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
    n_shared_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1, use_qk_norm=False, vocab_size=151552,
    max_position_embeddings=131072, num_nextn_predict_layers=0)
EOS, PAD = [151329, 151336, 151338], 151329


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the slice (Air has 46)")
    for field in ("hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts", "vocab_size"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(AIR, field),
                       help="shrink for a smoke run on CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def decode_step_ms(engine, prompts: list[list[int]], output_len: int, sync) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of one batch, timed inside one run: the first engine step prefills every
    prompt (the token budget holds them all) and samples the first tokens, the other output_len - 1 steps decode.
    (Subtracting a separately timed 1-token run could come out negative on a busy machine.)"""
    from glmserve.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    sync()
    start = time.perf_counter()
    requests = [engine.add_request(f"slice-{i}-{time.monotonic_ns()}", prompt, params)
                for i, prompt in enumerate(prompts)]
    engine.step()
    sync()
    prefilled = time.perf_counter()
    assert all(r.num_output_tokens == 1 for r in requests), "the first step did not prefill every prompt"
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    return (prefilled - start) * 1e3, (time.perf_counter() - prefilled) / (output_len - 1) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from glmserve.config import EngineConfig
    from glmserve.engine.llm_engine import LLMEngine

    shape = replace(AIR, num_hidden_layers=args.layers, hidden_size=args.hidden_size,
                    intermediate_size=args.intermediate_size, moe_intermediate_size=args.moe_intermediate_size,
                    n_routed_experts=args.n_routed_experts, vocab_size=args.vocab_size)
    config = config_dict(shape, EOS, PAD, dtype="bfloat16")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        max_batch = max(args.batch_size)
        engine = LLMEngine(EngineConfig(
            model=tmp, load_format="dummy", device=args.device, dtype=args.dtype, max_num_seqs=max_batch,
            max_num_batched_tokens=max(2048, max_batch * args.input_len), enable_prefix_caching=False,
            num_kv_blocks=max_batch * -(-(args.input_len + args.output_len) // 16) + 16), progress=False)
    model = engine.runner.model
    params = count_weight_params(config, ((n, p.numel()) for n, p in model.named_parameters()))
    bandwidth = measure_bandwidth(device, size_bytes=4 * GIB if device.type == "cuda" else GIB // 4)
    itemsize = next(model.parameters()).element_size()
    print(f"GLM-4.5-Air slice: {args.layers} layers, {params['total'] / 1e9:.2f}B parameters, "
          f"{params['per_decode_token'] / 1e9:.3f}B read per batch-1 token, {args.dtype} on {args.device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); read bandwidth "
          f"{bandwidth['roofline_GBps']:.0f} GB/s")
    print("batch | prefill ms | decode ms/step | decode tok/s | roofline ms/step | of roofline")
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batch_size:
        prompts = torch.randint(0, args.vocab_size - 1000, (batch, args.input_len), generator=generator).tolist()
        decode_step_ms(engine, prompts, 4, sync)  # warm-up
        runs = [decode_step_ms(engine, prompts, args.output_len, sync) for _ in range(args.num_iters)]
        prefill, step = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        roof = batch / roofline_tps(params, batch, itemsize, bandwidth["roofline_GBps"]) * 1e3
        results.append({"batch": batch, "prefill_ms": prefill, "decode_step_ms": step,
                        "decode_tps": batch / step * 1e3, "roofline_step_ms": roof, "of_roofline": roof / step})
        print(f"{batch:5d} | {prefill:10.1f} | {step:14.2f} | {batch / step * 1e3:12.1f} | {roof:16.2f} | "
              f"{roof / step:10.0%}", flush=True)
    if args.output_json:
        args.output_json.write_text(json.dumps(
            {"shape": config, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
             "bandwidth": bandwidth, "params": params, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
