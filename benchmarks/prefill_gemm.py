#!/usr/bin/env python
"""Quantized products at prefill shapes (M = 16..2048 activation rows): glmserve's native small-M kernel against
glmserve's prefill path (layers/quantization/prefill_gemm.py: AMX int8 tiles or torch._int_mm over per-row int8
activations for per-channel int8, each also timed alone, bf16 tiles and oneDNN's bf16 GEMM for the other layouts),
against the whole weight dequantized to fp32 and F.linear (MKL), and against fbgemm's dynamic int8 linear (per-
channel int8 only: the weight prepacked in each call, and prepacked once, which would keep a second copy of the
weight). It chose prefill_gemm's thresholds.

Weights here stay in cache between calls of one figure (prefill reads each weight once per chunk of many rows, so
the products are bound by arithmetic, not by the weight's read).

Examples:
    python benchmarks/prefill_gemm.py --output-json benchmarks/results/prefill-gemm.json
    python benchmarks/prefill_gemm.py --shapes 57m.dense_gate_up --formats int8-row --rows 64 256
"""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from glmserve import kernels
from glmserve.bench.host import OtherLoad, call_times, cpu_name, glmserve_revision, write_results
from glmserve.kernels import native
from glmserve.layers.quantization import prefill_gemm
from glmserve.layers.quantization.scaled import quantize_fp8

# (inputs K, outputs N): bench-57m's, bench-528m's and GLM-4.5-Air's linear and expert products.
SHAPES = {
    "57m.qkv_proj": (512, 512 + 2 * 128),
    "57m.dense_gate_up": (512, 2 * 1024),
    "57m.expert_gate_up": (512, 2 * 256),
    "57m.expert_down": (256, 512),
    "528m.qkv_proj": (1024, 1024 + 2 * 256),
    "528m.dense_down": (2816, 1024),
    "528m.expert_gate_up": (1024, 2 * 192),
    "air.o_proj": (12288, 4096),
    "air.expert_gate_up": (4096, 2 * 1408),
    "air.expert_down": (1408, 4096),
}
FORMATS = {"int8-row": (torch.int8, 0), "int8-g32": (torch.int8, 32), "int4-g128": (torch.uint8, 128),
           "int4-g32": (torch.uint8, 32), "fp8-row": (torch.float8_e4m3fn, 0), "fp8-b128": (torch.float8_e4m3fn, 128)}
QUANTIZE = {torch.int8: kernels.quantize_int8, torch.uint8: kernels.quantize_int4, torch.float8_e4m3fn: quantize_fp8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--max-gflop", type=float, default=40.0,
                   help="skip a (shape, rows) product above this many GFLOP (Air's at 2048 rows take seconds)")
    p.add_argument("--repeats", type=int, default=5, help="calls timed per figure (the fastest is kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def best_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up: on a shared 2-core machine one descheduled thread stalls a
    whole parallel region for a scheduler tick (4-8 ms), which a median of few calls does not always leave out."""
    return min(call_times(fn, repeats)) * 1e3


def fbgemm_weight(q: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's linear still takes them
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q, scales.view(-1).double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qt, None)


def candidates(dtype: torch.dtype, group: int, q: torch.Tensor, scales: torch.Tensor) -> dict:
    """name -> fn(x) for one weight."""
    out = {
        "native": lambda x: kernels.linear(x, q, scales, group),
        "fp32 dequantized + F.linear": lambda x: F.linear(x, kernels.dequantize(q, scales, group)),
        "prefill_gemm": lambda x: prefill_gemm.linear(x, q, scales, group),
    }
    if dtype == torch.int8 and group == q.shape[1]:
        packed = fbgemm_weight(q, scales)
        out["fbgemm prepacked"] = lambda x: torch.ops.quantized.linear_dynamic(x, packed)
        out["fbgemm prepack per call"] = lambda x: torch.ops.quantized.linear_dynamic(x, fbgemm_weight(q, scales))
        out["_int_mm"] = lambda x: kernels.int8_channel_gemm(x, q, scales.view(-1), tiles=False)
        if native.int8_tiles():
            out["AMX tiles"] = lambda x: kernels.int8_channel_gemm(x, q, scales.view(-1), tiles=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = OtherLoad()
    rows_out = []
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w = torch.randn(n, k) * 0.02
        for fmt in args.formats:
            dtype, group = FORMATS[fmt]
            q, scales = QUANTIZE[dtype](w, group or k)
            fns = candidates(dtype, group or k, q, scales)
            for m in args.rows:
                gflop = 2 * m * n * k / 1e9
                if gflop > args.max_gflop:
                    continue
                x = torch.randn(m, k)
                line = {"shape": shape, "K": k, "N": n, "format": fmt, "rows": m}
                for name, fn in fns.items():
                    ms = best_ms(lambda fn=fn: fn(x), args.repeats)
                    line[name] = round(ms, 3)
                best = min(fns, key=lambda name: line[name])
                print(f"{shape:20s} {fmt:9s} M={m:5d} " + " ".join(f"{nm}={line[nm]:.3f}" for nm in fns)
                      + f"  best={best} ({gflop / line[best] * 1e3:.0f} GFLOP/s)", flush=True)
                rows_out.append(line)
    if args.output_json:
        write_results(args.output_json, {
            "command": "benchmarks/prefill_gemm.py", "cpu": cpu_name(), "platform": platform.platform(),
            "threads": args.threads, "torch": torch.__version__, "glmserve_revision": glmserve_revision(),
            "other_processes_cores": load.cores(), "ms": rows_out})


if __name__ == "__main__":
    main()
