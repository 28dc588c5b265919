#!/usr/bin/env python
"""Where a decode step's time goes: glmserve's engine.step() loop after the prefill, at given batch sizes and
weight formats, under torch.profiler, with the native kernels and the step's parts made visible.

The native extension's calls (NATIVE_CALLS: linear, moe_experts, paged_attention and the small fused ops, and the
native decoder stack, which runs a step's layers in one call) are pybind functions the profiler does not see; this
script wraps them, and the engine's parts (scheduling, attention metadata, each attention / MoE / dense MLP module,
the router, the routed experts, the lm_head, sampling, the output update), in `record_function` labels at run time
(nothing in glmserve changes). Each label's self time is then Python and torch dispatch inside that part outside any
op, so the step splits into: native kernels, other torch ops (aten, by their self time), and Python (the labels' self
time, plus what no label covers). The profiler's own overhead lands mostly in the Python share: the step time without
the profiler is reported beside it.

With --py-spy, another plain decode loop runs under py-spy (sampling with native stacks; it pauses the process for
each sample, so that loop is slower too): each sample of the engine's thread goes to the native kernels if the
extension is on its stack, else to torch (its C++ libraries), else to torch's Python binding, else to Python; the
Python samples are listed by their innermost function.

    python benchmarks/profile_decode.py bench-57m --quantization int8 --batch-size 1 16 \\
        --output benchmarks/results/profile-decode-bench-57m-int8.txt
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from glmserve.bench.offline import BENCH_CACHE, random_prompts
from glmserve.config import QUANTIZATION_METHODS

NATIVE_CALLS = ("linear", "moe_experts", "paged_attention", "rms_norm", "rms_norm_residual", "qk_norm_rope_",
                "silu_and_mul", "router_topk", "argmax")
NATIVE, PART = "native::", "part::"


def labelled(label: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return call


class LabelledExtension:
    """The native extension with its kernels' calls labelled for the profiler."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        fn = getattr(self._ext, name)
        return labelled(NATIVE + name, fn) if name in NATIVE_CALLS else fn


class LabelledCallable:
    """An object whose calls are labelled; its other attributes are the object's."""

    def __init__(self, label: str, obj):
        self._obj, self._call = obj, labelled(label, obj)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._obj, name)


@contextlib.contextmanager
def labels(engine):
    """Label the native kernels and the step's parts for as long as the context lasts."""
    from glmserve.kernels import native
    from glmserve.layers.attention import AttentionMetadata
    from glmserve.layers.moe import FusedExperts, TopkRouter
    from glmserve.model.glm4_moe import Glm4MoeAttention, Glm4MoeMLP, Glm4MoeMoE
    from glmserve.model.native_stack import NativeStack

    patched: list[tuple[object, str, bool, object]] = []

    def patch(owner, name: str, replacement) -> None:
        """Set owner.name; restored afterwards (an attribute the owner did not hold itself is deleted again)."""
        own = vars(owner)
        patched.append((owner, name, name in own, own.get(name)))
        setattr(owner, name, replacement)

    ext = native.extension()
    if ext is not None:
        patch(native, "extension", lambda: LabelledExtension(ext))
    # a step's decoder layers in one native call where they run in it (its kernels are not seen one by one)
    patch(NativeStack, "__call__", labelled(NATIVE + "decoder_stack", NativeStack.__call__))
    runner, scheduler = engine.runner, engine.scheduler
    patch(scheduler, "schedule", labelled(PART + "schedule", scheduler.schedule))
    patch(scheduler, "update_from_output", labelled(PART + "update_from_output", scheduler.update_from_output))
    patch(runner, "sampler", LabelledCallable(PART + "sampler", runner.sampler))
    model = runner.model
    patch(model, "compute_logits", labelled(PART + "lm_head (final norm + linear)", model.compute_logits))
    build = AttentionMetadata.__dict__["build"]
    patch(AttentionMetadata, "build", classmethod(labelled(PART + "attention_metadata", build.__func__)))
    kinds = {Glm4MoeAttention: "attention block", Glm4MoeMoE: "moe block", Glm4MoeMLP: "dense / shared mlp",
             TopkRouter: "router", FusedExperts: "routed experts"}
    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is not None:
            patch(module, "forward", labelled(PART + kind, module.forward))
    try:
        yield
    finally:
        for owner, name, held, original in reversed(patched):
            if held:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def decode_loop(engine, prompts: list[list[int]], max_tokens: int, prof=None) -> tuple[int, float, int]:
    """Add the prompts, run the prefill step(s), then time the decode steps (under `prof` when given): steps,
    seconds and tokens (more than steps x batch with MTP drafts)."""
    from glmserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{i}-{time.monotonic_ns()}", p, params)
    while any(len(o.new_token_ids) == 0 for o in engine.step()):
        pass
    if prof is not None:
        prof.start()
    steps, tokens, t0 = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.stop()
    return steps, wall, tokens


def breakdown(prof, steps: int, wall: float) -> dict:
    """Per step (µs): each label's and op's self time and calls, grouped into native / torch ops / Python."""
    rows = defaultdict(lambda: {"self_us": 0.0, "total_us": 0.0, "calls": 0})
    for e in prof.key_averages():
        r = rows[e.key]
        r["self_us"] += e.self_cpu_time_total / steps
        r["total_us"] += e.cpu_time_total / steps
        r["calls"] += e.count / steps
    step_us = wall / steps * 1e6
    native = sum(r["self_us"] for k, r in rows.items() if k.startswith(NATIVE))
    python = sum(r["self_us"] for k, r in rows.items() if k.startswith(PART))
    covered = sum(r["self_us"] for r in rows.values())
    return {"step_us_under_profiler": step_us,
            "groups_us": {"native kernels (self)": native,
                          "torch ops (self; allocations inside native calls too)": covered - native - python,
                          "Python + dispatch inside the labelled parts (self)": python,
                          "outside every label and op (engine.step glue)": step_us - covered},
            "rows": dict(rows)}


TORCH_LIBRARIES = ("libtorch_cpu", "libc10", "libmkl", "libdnnl", "libgomp", "libfbgemm", "libiomp", "libsleef")


def classify(stack: list[str]) -> str:
    if any("glmserve_kernels" in f for f in stack):
        return "native kernels"
    if any(lib in f for f in stack for lib in TORCH_LIBRARIES):
        return "torch C++ (aten kernels, dispatcher, allocator)"
    if any("libtorch_python" in f for f in stack):
        return "torch Python binding (argument parsing)"
    return "Python"


def py_spy_loop(engine, prompts, max_tokens: int, rate: int) -> dict:
    """A plain decode loop under py-spy: the engine thread's samples by kind, and its Python samples' innermost
    functions."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen([py_spy, "record", "--native", "--rate", str(rate), "--format", "raw", "--output",
                                str(raw), "--pid", str(os.getpid())], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)  # py-spy attaches
        steps, wall, _ = decode_loop(engine, prompts, max_tokens)
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        _, err = spy.communicate(timeout=60)
        if not raw.is_file():
            raise RuntimeError(f"py-spy wrote nothing: {err.strip()[-500:]}")
        kinds, python, other = Counter(), Counter(), 0
        for line in raw.read_text().splitlines():
            frames, _, count = line.rpartition(" ")
            stack = frames.split(";")
            if not any(f.startswith("decode_loop ") for f in stack):
                other += int(count)  # idle moments before or after the loop, and the OpenMP worker thread
                continue
            stack = stack[next(i for i, f in enumerate(stack) if f.startswith("decode_loop ")):]
            kind = classify(stack[1:])
            kinds[kind] += int(count)
            if kind == "Python":
                python[next((f for f in reversed(stack) if ".py:" in f), stack[-1])] += int(count)
    total = sum(kinds.values())
    return {"step_us_under_py_spy": wall / steps * 1e6, "rate_hz": rate, "engine_thread_samples": total,
            "other_samples": other, "share": {k: n / total for k, n in kinds.most_common()},
            "python_innermost": {f: n / total for f, n in python.most_common(15)}}


def py_spy_table(s: dict) -> str:
    lines = [f"py-spy at {s['rate_hz']} Hz over another plain loop ({s['step_us_under_py_spy'] / 1e3:.2f} ms/step "
             f"under it), {s['engine_thread_samples']} samples of the engine thread inside the loop:"]
    lines += [f"  {k:52s} {v:6.1%}" for k, v in s["share"].items()]
    lines += ["  Python samples by innermost Python function (share of all samples):"]
    lines += [f"    {f[:90]:90s} {v:6.1%}" for f, v in s["python_innermost"].items()]
    return "\n".join(lines)


def table(b: dict, top: int) -> str:
    step = b["step_us_under_profiler"]
    lines = [f"{'group':52s} {'us/step':>9s} {'share':>6s}"]
    for name, us in b["groups_us"].items():
        lines.append(f"{name:52s} {us:9.1f} {us / step:6.1%}")
    lines += ["", f"{'label or op':52s} {'self us':>9s} {'total us':>9s} {'calls':>6s} {'self share':>10s}"]
    ranked = sorted(b["rows"].items(), key=lambda kv: -kv[1]["self_us"])[:top]
    for name, r in ranked:
        lines.append(f"{name[:52]:52s} {r['self_us']:9.1f} {r['total_us']:9.1f} {r['calls']:6.1f} "
                     f"{r['self_us'] / step:10.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="checkpoint directory or named shape (bench-57m, bench-528m, air-100m)")
    p.add_argument("--quantization", choices=tuple(QUANTIZATION_METHODS), help="glmserve's --quantization")
    p.add_argument("--speculative-tokens", type=int, default=0, help="MTP drafts per step (a checkpoint with an MTP "
                   "layer: the embedded model)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--top", type=int, default=30, help="rows of the per-op table")
    p.add_argument("--py-spy", type=int, default=0, metavar="HZ", help="also sample a plain loop with py-spy at HZ")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--output", type=Path, help="write the report here (and the numbers beside it as .json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from glmserve.bench.checkpoints import prepare_checkpoint
    from glmserve.bench.engines import GlmserveEngine
    from glmserve.bench.host import OtherLoad, cpu_name, glmserve_revision
    from glmserve.kernels.native import default_isa

    directory = prepare_checkpoint(args.model, args.cache_dir)
    max_batch = max(args.batch_size)
    engine = GlmserveEngine(directory, max_batch, args.input_len, args.output_len, "auto", "cpu",
                            quantization=args.quantization, num_speculative_tokens=args.speculative_tokens)
    prompts = random_prompts(directory, max_batch, args.input_len, args.seed)
    header = (f"{engine.name} on {directory.name}, {args.speculative_tokens} MTP drafts per step, {args.threads} "
              f"threads, {args.input_len}-token prompts, "
              f"{args.output_len} new tokens; {cpu_name()}; kernel path {default_isa()}; torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out, record = [header], {"header": header, "command": " ".join(sys.argv), "revision": glmserve_revision(),
                             "batches": {}}
    eng = engine.llm.engine
    for b in args.batch_size:
        decode_loop(eng, prompts[:b], 8)  # warm-up
        load = OtherLoad()
        steps, wall, tokens = decode_loop(eng, prompts[:b], args.output_len)
        plain_us = wall / steps * 1e6
        with labels(eng):
            decode_loop(eng, prompts[:b], 8)
            prof = profile(activities=[ProfilerActivity.CPU])
            psteps, pwall, _ = decode_loop(eng, prompts[:b], args.output_len, prof)
        spy = py_spy_loop(eng, prompts[:b], args.output_len, args.py_spy) if args.py_spy else None
        other = load.cores()
        result = breakdown(prof, psteps, pwall)
        result.update(step_us=plain_us, tok_s=tokens / wall, tokens_per_step=tokens / steps,
                      other_processes_cores=other, py_spy=spy)
        record["batches"][str(b)] = result
        out += ["", f"== batch {b}: {plain_us / 1e3:.2f} ms/step without the profiler ({tokens / steps:.2f} tokens per "
                    f"step, {tokens / wall:.1f} tok/s), "
                    f"{pwall / psteps * 1e3:.2f} ms under it; other processes {other:.2f} cores ==",
                table(result, args.top)] + ([py_spy_table(spy)] if spy else [])
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
