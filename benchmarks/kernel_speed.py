#!/usr/bin/env python
"""glmserve's native kernels (glmserve/kernels) at decode shapes, beside the kernels torch already ships and beside
the weight-read roofline: a product reads its weights (and scales) once, so it takes at least bytes / bandwidth,
with the read bandwidth measured in the same run and thread count (glmserve.bench.roofline).

Each figure is the median of --repeats calls, each on another copy of the weight from a pool larger than the L3
cache, so that the weights come from memory as in a real decode step. Torch's kernels: fp32 F.linear (MKL/oneDNN),
fbgemm's dynamic-int8 linear (per-channel int8 weights, activations quantized per call) and fp16 linear,
aten's _weight_int8pack_mm and _weight_int4pack_mm_for_cpu (bf16 activations, as they are fast only with those).

Examples:
    python benchmarks/kernel_speed.py --output-json benchmarks/results/kernels.json
    python benchmarks/kernel_speed.py --threads 1 --batch-size 1 --shapes air.o_proj --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from glmserve import kernels
from glmserve.bench.host import OtherLoad, cpu_name, glmserve_revision, write_results
from glmserve.bench.roofline import measure_bandwidth
from glmserve.distributed import ParallelContext
from glmserve.kernels import native
from glmserve.layers.moe import FusedExperts
from glmserve.layers.quantization import Fp16Method, UnquantizedMethod

# (inputs K, outputs N) of the products one decode step runs: GLM-4.5-Air's (hidden 4096, moe_intermediate 1408),
# bench-57m's (glmserve/bench/checkpoints.py: hidden 512, 8 heads of 64, 2 KV heads, intermediate 1024,
# moe_intermediate 256, vocab 32000) and bench-528m's (hidden 1024, 16 heads of 64, 4 KV heads, intermediate 2816,
# moe_intermediate 192). The default run leaves out the 528m shapes (--shapes picks them).
SHAPES = {
    "air.o_proj": (4096, 4096),
    "air.expert_gate_up": (4096, 2 * 1408),
    "air.expert_down": (1408, 4096),
    "57m.qkv_proj": (512, 512 + 2 * 128),
    "57m.dense_gate_up": (512, 2 * 1024),
    "57m.dense_down": (1024, 512),
    "57m.expert_gate_up": (512, 2 * 256),
    "57m.lm_head": (512, 32000),
    "528m.qkv_proj": (1024, 1024 + 2 * 256),
    "528m.o_proj": (1024, 1024),
    "528m.dense_gate_up": (1024, 2 * 2816),
    "528m.dense_down": (2816, 1024),
    "528m.expert_gate_up": (1024, 2 * 192),
    "528m.expert_down": (192, 1024),
    "528m.lm_head": (1024, 32000),
}
DEFAULT_SHAPES = [s for s in SHAPES if not s.startswith("528m.")]
# The MoE blocks measured: (hidden, moe_intermediate, routed experts, top-k). Air has 128 experts; top-8 of 16
# keeps memory small. The bench shapes' blocks are whole.
MOE_SHAPES = {"air": (4096, 1408, 16, 8), "57m": (512, 256, 16, 4), "528m": (1024, 192, 64, 8)}
# Native formats: (weight dtype, group size; 0 = one scale per row). int8/int4 in groups of 32 are llama.cpp's
# q8_0 / q4_0 layouts; int4 in groups of 128 is AWQ's.
NATIVE_FORMATS = {"fp32": ("float32", 0), "bf16": ("bfloat16", 0), "fp16": ("float16", 0), "fp8": ("fp8", 0),
                  "int8-row": ("int8", 0), "int8-g32": ("int8", 32), "int4-g32": ("int4", 32),
                  "int4-g128": ("int4", 128)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    p.add_argument("--kernels", nargs="+", metavar="SUBSTRING",
                   help="only the kernels whose name contains one of these (e.g. fp32 onednn)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--repeats", type=int, default=15, help="calls timed per figure (median)")
    p.add_argument("--moe-shapes", nargs="*", default=["air"], choices=list(MOE_SHAPES),
                   help="MoE blocks to measure (none: skip them)")
    p.add_argument("--moe-batch-size", type=int, nargs="+",
                   help="tokens per MoE block call (default: the --batch-size values up to 16)")
    p.add_argument("--pool-mib", type=int, default=160,
                   help="weight copies cycled through per figure, in MiB: several times the L3 cache")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the calling thread's CPU time (time.thread_time), which leaves out the time other "
                        "processes hold the core: for a busy machine, and only with --threads 1")
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != [1]:
        p.error("--clock cpu measures the calling thread alone: use it with --threads 1")
    return args


def make_weight(fmt: str, group_size: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(n, k) * 0.02
    if fmt == "int8":
        return kernels.quantize_int8(w, group_size or k)
    if fmt == "int4":
        return kernels.quantize_int4(w, group_size or k)
    if fmt == "fp8":
        scales = w.abs().amax(1, keepdim=True) / 448
        return (w / scales).to(torch.float8_e4m3fn), scales
    return w.to(getattr(torch, fmt)), None


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def pool_of(make, size: int, pool_bytes: int) -> list:
    """Copies of one weight, enough of them to fill pool_bytes (so each call reads from memory); tensors are
    cloned, torch's packed weights (opaque objects) made anew."""
    first = make()

    def copy():
        if isinstance(first, torch.Tensor):
            return first.clone()
        if isinstance(first, tuple) and all(t is None or isinstance(t, torch.Tensor) for t in first):
            return tuple(None if t is None else t.clone() for t in first)
        return make()

    return [first] + [copy() for _ in range(max(1, -(-pool_bytes // max(size, 1)) - 1))]


def median_us(fn, pool: list, repeats: int, clock=time.perf_counter) -> float:
    fn(pool[0])
    times = []
    for i in range(repeats):
        item = pool[(i + 1) % len(pool)]
        t0 = clock()
        fn(item)
        times.append(clock() - t0)
    return statistics.median(times) * 1e6


def torch_kernels(k: int, n: int) -> dict:
    """name -> (factory of one weight copy, fn(x, copy), weight bytes) for the kernels torch ships."""
    def fp32():
        return torch.randn(n, k) * 0.02

    def fbgemm_int8():
        w = torch.randn(n, k) * 0.02
        scales = (w.abs().amax(1) / 127).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's linear still takes them
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)

    def fbgemm_fp16():
        return torch.ops.quantized.linear_prepack_fp16(torch.randn(n, k) * 0.02, None)

    def int8pack():
        q, s = kernels.quantize_int8(torch.randn(n, k) * 0.02, k)
        return q, s.view(n).bfloat16()

    def int4pack():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        scales_zeros = torch.stack([torch.rand(k // 32, n), torch.zeros(k // 32, n)], -1).bfloat16()
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros

    def onednn_packed():
        return torch.ops.mkldnn._reorder_linear_weight(fp32(), None)

    return {
        "torch fp32 F.linear": (fp32, lambda x, w: F.linear(x, w), 4 * n * k),
        "torch fp32 oneDNN packed": (onednn_packed, lambda x, w: torch.ops.mkldnn._linear_pointwise(
            x, w, None, "none", [], ""), 4 * n * k),
        "torch fbgemm linear_dynamic int8": (fbgemm_int8, lambda x, w: torch.ops.quantized.linear_dynamic(x, w),
                                             n * k + 8 * n),
        "torch fbgemm linear_dynamic_fp16": (fbgemm_fp16,
                                             lambda x, w: torch.ops.quantized.linear_dynamic_fp16(x, w), 2 * n * k),
        "torch _weight_int8pack_mm bf16": (int8pack, lambda x, w: torch.ops.aten._weight_int8pack_mm(
            x.bfloat16(), *w), n * k + 2 * n),
        "torch _weight_int4pack_mm_for_cpu g32 bf16": (
            int4pack, lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w[0], 32, w[1]),
            n * k // 2 + 4 * n * k // 32),
    }


def wanted(kernel: str, filters: list[str] | None) -> bool:
    return filters is None or any(f.lower() in kernel.lower() for f in filters)


def linear_rows(shape: str, batches: list[int], repeats: int, bandwidth_gbps: float, clock,
                pool_bytes: int, filters: list[str] | None = None) -> list[dict]:
    k, n = SHAPES[shape]
    rows = []

    def record(kernel: str, make, fn, weight_bytes: int):
        if not wanted(kernel, filters):
            return
        pool = pool_of(make, weight_bytes, pool_bytes)
        for batch in batches:
            x = torch.randn(batch, k)
            try:
                with torch.no_grad():
                    us = median_us(lambda w: fn(x, w), pool, repeats, clock)
            except RuntimeError as error:  # a torch kernel this build lacks
                rows.append({"shape": shape, "kernel": kernel, "batch": batch, "error": str(error)[:200]})
                continue
            roofline_us = weight_bytes / bandwidth_gbps / 1e3
            rows.append({"shape": shape, "K": k, "N": n, "kernel": kernel, "batch": batch, "us": round(us, 1),
                         "weight_bytes": weight_bytes, "roofline_us": round(roofline_us, 1),
                         "pct_of_roofline": round(100 * roofline_us / us, 1)})
        del pool

    for name, (fmt, group_size) in NATIVE_FORMATS.items():
        size = nbytes(*make_weight(fmt, group_size, n, k))
        record(f"glmserve {name}", lambda fmt=fmt, g=group_size: make_weight(fmt, g, n, k),
               lambda x, w, g=group_size: kernels.linear(x, w[0], w[1], g), size)
    for kernel, (make, fn, size) in torch_kernels(k, n).items():
        record(kernel, make, fn, size)
    return rows


def expert_layer(method, hidden: int, inter: int, experts: int, fmt: str | None = None,
                 group_size: int = 0) -> FusedExperts:
    """One MoE block's routed experts, random weights: through `method` (fmt None: as a float model loads them), or
    in a native format `fmt` (layer.w13 / w2 replaced by its stacks, layer.s13 / s2 its scales)."""
    layer = FusedExperts(experts, hidden, inter, ParallelContext(), method)
    with torch.no_grad():
        if fmt is None:
            layer.w13.normal_(0, 0.02)
            layer.w2.normal_(0, 0.02)
            if isinstance(method, Fp16Method):  # fbgemm's form, whether or not the native kernel is here
                method.pack_experts_for_fbgemm(layer)
            else:
                layer.process_weights_after_loading()
            return layer
        for name, rows, cols in (("w13", 2 * inter, hidden), ("w2", hidden, inter)):
            pairs = [make_weight(fmt, group_size, rows, cols) for _ in range(experts)]
            getattr(layer, name).data = torch.stack([w for w, _ in pairs])
            setattr(layer, name.replace("w", "s"), None if pairs[0][1] is None else torch.stack([s for _, s in pairs]))
    return layer


def moe_kernels(hidden: int, inter: int, experts: int) -> dict:
    """name -> (factory of one MoE block, fn(layer, x, weights, ids)): the native one-call block in each format,
    and the float methods' torch paths (torch's grouped GEMM or a loop of products per expert, as
    FusedExperts.grouped_forward picks; with fp16 storage, fbgemm's fp16 GEMM per expert)."""
    def native_block(name):
        fmt, group_size = NATIVE_FORMATS[name]
        return (lambda: expert_layer(UnquantizedMethod(), hidden, inter, experts, fmt, group_size),
                lambda layer, x, w, ids: kernels.moe_experts(x, w, ids, layer.w13, layer.s13, layer.w2, layer.s2,
                                                             group_size))

    def torch_block(method):
        return (lambda: expert_layer(method, hidden, inter, experts),
                lambda layer, x, w, ids: layer.grouped_forward(x, w, ids, method.expert,
                                                               allow_grouped_mm=layer.quant_method is not fp16))

    fp16 = Fp16Method()
    table = {f"glmserve moe_experts {name}": native_block(name)
             for name in ("fp32", "fp16", "bf16", "int8-row", "int8-g32", "int4-g128", "int4-g32")}
    table["torch grouped_forward fp32"] = torch_block(UnquantizedMethod())
    table["torch grouped_forward fp16 (fbgemm)"] = torch_block(fp16)
    return table


def moe_rows(shape: str, batches: list[int], repeats: int, bandwidth_gbps: float, clock, pool_bytes: int,
             filters: list[str] | None = None) -> list[dict]:
    """One MoE block's routed experts per call, random routing each call, cycling through copies of the block so
    that its weights come from memory; the roofline counts the distinct experts a call's tokens pick."""
    hidden, inter, experts, top_k = MOE_SHAPES[shape]
    rows = []
    for kernel, (make, fn) in moe_kernels(hidden, inter, experts).items():
        if not wanted(kernel, filters) or (shape == "air" and "fp32" in kernel):  # Air's fp32 block: 1.1 GiB
            continue
        first = make()
        block_bytes = sum(t.numel() * t.element_size() for t in first.state_dict().values())
        block_bytes += sum(nbytes(getattr(first, s, None)) for s in ("s13", "s2"))
        if getattr(first, "fp16_experts", None) is not None:
            block_bytes = experts * 3 * hidden * inter * 2
        pool = [first] + [make() for _ in range(max(1, -(-pool_bytes // block_bytes) - 1))]
        expert_bytes = block_bytes / experts
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            x = torch.randn(batch, hidden)
            times, roofs = [], []
            for i in range(repeats + 1):
                ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(batch)])
                weights = torch.rand(batch, top_k, generator=gen)
                with torch.no_grad():
                    t0 = clock()
                    fn(pool[i % len(pool)], x, weights, ids)
                    times.append(clock() - t0)
                roofs.append(ids.unique().numel() * expert_bytes / bandwidth_gbps / 1e3)
            us, roofline_us = statistics.median(times[1:]) * 1e6, statistics.median(roofs[1:])
            rows.append({"shape": f"{shape}.moe_block E={experts} top-{top_k}", "kernel": kernel,
                         "batch": batch, "us": round(us, 1), "roofline_us": round(roofline_us, 1),
                         "pct_of_roofline": round(100 * roofline_us / us, 1)})
        del pool, first
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if native.extension() is None:
        raise SystemExit("the native extension is not built here (see the warning above); nothing to measure")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load = OtherLoad()
    results = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
               "isa": native.default_isa(), "isas": list(native.available_isas()), "revision": glmserve_revision(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "clock": args.clock,
               "load_average_start": os.getloadavg(),
               "runs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth = measure_bandwidth(torch.device("cpu"), 2**28)
        run = {"threads": threads, "bandwidth": bandwidth, "rows": []}
        print(f"{threads} thread(s): read bandwidth {bandwidth['roofline_GBps']:.1f} GB/s")
        for shape in args.shapes:
            rows = linear_rows(shape, args.batch_size, args.repeats, bandwidth["roofline_GBps"], clock,
                               args.pool_mib * 2**20, args.kernels)
            print_rows(threads, rows)
            run["rows"] += rows
        for shape in args.moe_shapes:
            batches = args.moe_batch_size or [b for b in args.batch_size if b <= 16]
            rows = moe_rows(shape, batches, args.repeats, bandwidth["roofline_GBps"], clock, args.pool_mib * 2**20,
                            args.kernels)
            print_rows(threads, rows)
            run["rows"] += rows
        results["runs"].append(run)
    results["other_processes_cores"] = round(load.cores(), 2)
    results["load_average_end"] = os.getloadavg()
    print(f"other processes used {results['other_processes_cores']} cores on average during the run")
    if args.output_json:
        write_results(args.output_json, results)
    return 0


def print_rows(threads: int, rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{threads}t {r['shape']:22s} M={r['batch']:<3d} {r['kernel']:44s} error: {r['error'][:60]}")
        else:
            print(f"{threads}t {r['shape']:22s} M={r['batch']:<3d} {r['kernel']:44s} {r['us']:9.1f} us "
                  f"{r['pct_of_roofline']:6.1f}% of roofline")


if __name__ == "__main__":
    raise SystemExit(main())
