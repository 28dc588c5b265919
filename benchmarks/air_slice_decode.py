#!/usr/bin/env python
"""Decode speed of a GLM-4.5-Air-shaped slice on CPU with quantized weights (issue 20), against the weight-read
roofline counted step by step: Air's hidden size, heads, 128 routed experts top-8 + 1 shared and vocabulary,
layer 0 dense and --moe-layers MoE layers (the slice of benchmarks/quant_memory.py), random weights
(`--load-format dummy`), one --quantization per run (the int8 slice takes ~8 GiB).

For each batch size: b random prompts, greedy, EOS ignored; decode tokens/s = b x (decode steps) / their time
(from the end of the prefill step to the end of the run), median of --num-iters runs. The roofline counts the bytes
of weights each decode step reads: every weight and scale once (attention, the dense layer, the shared experts,
routers, norms, lm_head) except the embedding table (b rows) and the routed experts, of which each MoE layer reads
the experts that step's tokens were routed to (recorded from the routers, not assumed); divided by the read
bandwidth measured in the same run (benchmarks/kernel_speed.py's measurement, glmserve.bench.roofline). KV-cache reads
are left out (small at these lengths), which keeps the bound an upper one. The routers' choices are recorded in a
run of their own, through hooks, which keep that run's steps on the modules (the native decoder stack calls no
module); the timed runs then take the engine's default path, the stack where a step fits it (--modules: the
modules, hooks on), and must produce the recorded run's tokens, so their steps read what it read.

    python benchmarks/air_slice_decode.py --quantization int8 --cpu-lock /work/cpu.lock \\
        --output-json benchmarks/results/air-slice-decode-int8.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quant_memory import available_bytes, fitting_slice  # noqa: E402

from glmserve.bench.host import (  # noqa: E402
    OtherLoad,
    cpu_name,
    exclusive_lock,
    glmserve_revision,
    write_results,
)
from glmserve.bench.memory import write_config  # noqa: E402
from glmserve.bench.roofline import measure_bandwidth  # noqa: E402
from glmserve.kernels import native  # noqa: E402

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quantization", default="int8", help="--quantization of the slice (int8, int4, q8_0, ...)")
    p.add_argument("--moe-layers", type=int, default=3, help="MoE layers after the dense layer 0 (issue: 3-5)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=17, help="tokens per request: the first comes from prefill")
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--headroom", type=float, default=0.8, help="share of the available memory the slice may take")
    p.add_argument("--cpu-lock", type=Path, help="hold this file's exclusive flock while timing (not while loading)")
    p.add_argument("--modules", action="store_true", help="time the steps on the modules, not the native stack")
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


class StepBytes:
    """Bytes of weights a decode step reads: `fixed` every step, plus `expert_bytes` for each (MoE layer, expert)
    the step's tokens were routed to, recorded by forward hooks on the routers while `recording`."""

    def __init__(self, model: torch.nn.Module, batch_rows: int):
        from glmserve.layers.moe import FusedExperts, TopkRouter

        tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n.endswith("_scale")}
        experts = [m for m in model.modules() if isinstance(m, FusedExperts)]
        expert_tensors = {id(t) for m in experts for t in (m.w13, m.w2, m.w13_scale, m.w2_scale)}
        embedding = [t for n, t in tensors.items() if n.startswith("model.embed_tokens.")]
        self.embedding_row_bytes = sum(_nbytes(t) // t.shape[0] for t in embedding)
        self.fixed = sum(_nbytes(t) for n, t in tensors.items()
                         if id(t) not in expert_tensors and not n.startswith("model.embed_tokens."))
        self.fixed += batch_rows * self.embedding_row_bytes
        per_layer = {_nbytes(m.w13) + _nbytes(m.w2) + _nbytes(m.w13_scale) + _nbytes(m.w2_scale) for m in experts}
        counts = {len(m.expert_ids) for m in experts}
        assert len(per_layer) == 1 and len(counts) == 1, "MoE layers of different shapes"
        self.expert_bytes = per_layer.pop() // counts.pop()
        self.recording, self.routed = False, []
        self.hooks = [m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, TopkRouter)]

    def _record(self, module, inputs, output) -> None:
        if self.recording:
            self.routed.append(output[1].clone())

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def routed_bytes(self) -> int:
        return sum(ids.unique().numel() for ids in self.routed) * self.expert_bytes

    def experts_per_moe_layer_step(self) -> float:
        return sum(ids.unique().numel() for ids in self.routed) / len(self.routed)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_run(engine, prompts: list[list[int]], output_len: int, counter: StepBytes | None = None) -> dict:
    """One batch: the first step prefills every prompt, the other output_len - 1 decode; their time and tokens, and
    with a `counter` the experts they were routed to."""
    from glmserve.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    requests = [engine.add_request(f"slice-{i}-{time.monotonic_ns()}", prompt, params)
                for i, prompt in enumerate(prompts)]
    engine.step()
    assert all(r.num_output_tokens == 1 for r in requests), "the first step did not prefill every prompt"
    if counter is not None:
        counter.routed.clear()
        counter.recording = True
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    if counter is not None:
        counter.recording = False
    return {"decode_s": elapsed, "steps": steps, "tokens": steps * len(prompts),
            "output_token_ids": [list(r.output_token_ids) for r in requests]}


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from glmserve.config import EngineConfig
    from glmserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    shape = fitting_slice(args.quantization, args.moe_layers, args.headroom)
    if shape is None:
        raise SystemExit(f"too little memory available ({available_bytes() / GIB:.1f} GiB) for one MoE layer")
    max_batch = max(args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(shape, Path(tmp))
        loaded = time.perf_counter()
        engine = LLMEngine(EngineConfig(
            model=str(model_dir), load_format="dummy", quantization=args.quantization, max_num_seqs=max_batch,
            max_num_batched_tokens=max(2048, max_batch * args.input_len), enable_prefix_caching=False,
            max_model_len=args.input_len + args.output_len,
            num_kv_blocks=max_batch * -(-(args.input_len + args.output_len) // 16) + 16), progress=False)
        load_s = time.perf_counter() - loaded
    model = engine.runner.model
    print(f"{args.quantization}: Air slice with {shape.num_hidden_layers - 1} MoE layers loaded in {load_s:.0f} s; "
          f"kernel path {native.default_isa()}", flush=True)
    generator = torch.Generator().manual_seed(0)
    results = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
               "revision": glmserve_revision(), "isa": native.default_isa(), "quantization": args.quantization,
               "moe_layers": shape.num_hidden_layers - 1, "threads": args.threads, "input_len": args.input_len,
               "output_len": args.output_len, "timed_on": "modules" if args.modules else "engine default (stack)",
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "load_s": load_s, "batches": []}
    with exclusive_lock(args.cpu_lock):
        load = OtherLoad()
        results["load_average_start"] = os.getloadavg()
        bandwidth = measure_bandwidth(torch.device("cpu"), 2**28)
        results["bandwidth"] = bandwidth
        gbps = bandwidth["roofline_GBps"]
        print(f"read bandwidth {gbps:.1f} GB/s ({args.threads} threads)")
        print("batch | decode tok/s | ms/step | GB read/step | experts/MoE layer/step | of roofline")
        for batch in args.batch_size:
            counter = StepBytes(model, batch)
            prompts = torch.randint(0, shape.vocab_size - 1000, (batch, args.input_len),
                                    generator=generator).tolist()
            decode_run(engine, prompts, 3)  # warm-up, on the modules
            recorded = decode_run(engine, prompts, args.output_len, counter)
            if not args.modules:
                counter.remove_hooks()
                decode_run(engine, prompts, 3)  # warm-up, in the stack
            runs = [decode_run(engine, prompts, args.output_len) for _ in range(args.num_iters)]
            if args.modules:
                counter.remove_hooks()
            for run in runs:
                assert run.pop("output_token_ids") == recorded["output_token_ids"], "a timed run took other tokens"
                run["bytes_read"] = run["steps"] * counter.fixed + counter.routed_bytes()
                run["experts_per_moe_layer_step"] = counter.experts_per_moe_layer_step()
                run["tok_s"] = run["tokens"] / run["decode_s"]
                run["of_roofline"] = run["bytes_read"] / (gbps * 1e9) / run["decode_s"]
            row = {"batch": batch, "decode_tok_s": statistics.median(r["tok_s"] for r in runs),
                   "of_roofline": statistics.median(r["of_roofline"] for r in runs),
                   "fixed_bytes_per_step": counter.fixed, "expert_bytes": counter.expert_bytes, "runs": runs}
            results["batches"].append(row)
            steps = sum(r["steps"] for r in runs)
            print(f"{batch:5d} | {row['decode_tok_s']:12.2f} | {1e3 * batch / row['decode_tok_s']:7.1f} | "
                  f"{sum(r['bytes_read'] for r in runs) / steps / 1e9:12.3f} | "
                  f"{statistics.mean(r['experts_per_moe_layer_step'] for r in runs):22.1f} | "
                  f"{row['of_roofline']:10.1%}", flush=True)
        results["other_processes_cores"] = round(load.cores(), 2)
        results["load_average_end"] = os.getloadavg()
    print(f"other processes used {results['other_processes_cores']} cores on average while timing")
    if args.output_json:
        write_results(args.output_json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
