#!/usr/bin/env python
"""Offline decode throughput: glmserve's `LLM.generate` against transformers' `generate`, in one run.

The workload is ../shared/reference/BENCH.md's: `prompt_len` (128) random prompt token ids per sequence,
`max_new_tokens` (128) new tokens, greedy, EOS ignored, `b` sequences at once, 2 threads. For each engine and batch
size, every repetition times a `max_tokens=1` run (prefill plus the first token) and a full run; decode tokens/s is
`b * (max_new_tokens - 1) / (full - prefill)`. Engines alternate within each repetition (the order flips every
repetition), so machine noise hits both; the medians and their ratio come from the same run.

The checkpoint is random, in the real Hugging Face layout (glmserve.testing.checkpoint), written once into a cache
directory outside the repository and reused. Named shapes:

- `bench-57m`: BENCH.md's reference checkpoint (hidden 512, 4 layers, 16 experts top-4, vocab 32000; 57.0M params).
- `air-100m`: GLM-4.5-Air-shaped (no QK-norm, 1 dense layer, scaling 1.0), 104.8M params; see SHAPES.

`--model DIR` also takes any existing checkpoint directory.

Also printed: the memory-bandwidth roofline for batch-1 decode, i.e. (bytes of the weights one decode token reads:
attention, dense MLP, router, shared experts, top-k routed experts, final norm, lm_head; fp32) / (this machine's
read bandwidth, measured here on 1 GiB), and glmserve's batch-1 decode rate as a fraction of it.

Examples:
    python benchmarks/offline_throughput.py                                    # bench-57m, batch 1 and 16, 3 reps
    python benchmarks/offline_throughput.py --model air-100m --batch 1 16 --reps 5 --json benchmarks/results/x.json
    python benchmarks/offline_throughput.py --engines glmserve --profile      # where glmserve's step time goes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from glmserve.testing.checkpoint import TinyShape, write_random_checkpoint

SHAPES: dict[str, TinyShape] = {
    # Exactly BENCH.md's reference checkpoint.
    "bench-57m": TinyShape(
        hidden_size=512, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, use_qk_norm=True, vocab_size=32000, max_position_embeddings=4096,
        num_nextn_predict_layers=0),
    # GLM-4.5-Air's structure scaled down to ~100M: no QK-norm, 1 dense layer of 6, scaling 1.0, top-4 of 32
    # routed experts plus 1 shared, q width = hidden (12 heads x 64), 2 KV heads. 104.8M params, 55.7M
    # non-embedding, 44.1M read per decode token (incl. the 24.6M lm_head).
    "air-100m": TinyShape(
        hidden_size=768, num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=12,
        num_key_value_heads=2, head_dim=64, intermediate_size=2048, moe_intermediate_size=112,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, use_qk_norm=False, vocab_size=32000, max_position_embeddings=4096,
        num_nextn_predict_layers=0),
}
CHECKPOINT_SEED = 0
GIB = 2**30


# ----------------------------------------------------------------------------------------------- checkpoint


def prepare_checkpoint(model: str, cache_dir: Path) -> Path:
    """A named shape is written once into cache_dir/NAME (rewritten when the shape changed); a path is used as is."""
    if model not in SHAPES:
        path = Path(model)
        if not (path / "config.json").exists():
            raise SystemExit(f"--model {model!r} is neither a named shape ({', '.join(SHAPES)}) nor a checkpoint "
                             "directory with a config.json")
        return path
    shape = SHAPES[model]
    directory = cache_dir / model
    stamp = directory / "bench_shape.json"
    wanted = {"shape": asdict(shape), "seed": CHECKPOINT_SEED}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and (directory / "model.safetensors").exists():
        return directory
    print(f"writing random checkpoint {model} to {directory} ...", flush=True)
    write_random_checkpoint(directory, shape, seed=CHECKPOINT_SEED, config_style="5")
    stamp.write_text(json.dumps(wanted, indent=2))
    return directory


def check_token_ids(directory: Path) -> tuple[int, list[int]]:
    """Returns (number of tokenizer tokens, EOS ids); the EOS ids must be real tokens below vocab_size."""
    from tokenizers import Tokenizer

    config = json.loads((directory / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    num_tokens = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if not num_tokens <= config["vocab_size"] or not all(e is not None and 0 <= e < num_tokens for e in eos):
        raise SystemExit(f"{directory}: EOS ids {eos} are not tokens of the tokenizer ({num_tokens} tokens) "
                         f"or it exceeds vocab_size {config['vocab_size']}")
    return num_tokens, eos


def count_params(directory: Path) -> dict:
    """Parameter counts from the safetensors headers; `per_token` is what one decode token reads (the embedding
    table is a row lookup, so it is left out; routed experts count top_k / n_experts of their weights)."""
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    total = embedding = routed = mtp = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
                if name.startswith(mtp_prefix):
                    mtp += n
                elif name == "model.embed_tokens.weight":
                    embedding += n
                elif ".mlp.experts." in name:
                    routed += n
    active_routed = routed * config["num_experts_per_tok"] // config["n_routed_experts"]
    per_token = total - mtp - embedding - routed + active_routed
    lm_head = config["vocab_size"] * config["hidden_size"]
    return {"total": total, "embedding": embedding, "lm_head": lm_head, "mtp": mtp,
            "non_embedding": total - mtp - embedding - (0 if config.get("tie_word_embeddings") else lm_head),
            "routed_experts": routed, "per_decode_token": per_token}


# ----------------------------------------------------------------------------------------------- bandwidth


def _best_time(fn, reps: int) -> float:
    """Fastest of reps: what the hardware does when no other process competes for memory."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(size_bytes: int = GIB, reps: int = 5) -> dict:
    """GB/s (1e9 bytes/s) on 1 GiB fp32 tensors, best of `reps`: `sum` (read), `copy_` (read + write, both
    counted) and a GEMV over a 1 GiB matrix (the access pattern of batch-1 decode). The roofline uses the faster
    of the two read rates."""
    n = size_bytes // 4
    x = torch.ones(n)
    read = size_bytes / _best_time(lambda: x.sum(), reps) / 1e9
    y = torch.empty_like(x)
    copy = 2 * size_bytes / _best_time(lambda: y.copy_(x), reps) / 1e9
    del y
    side = int(n**0.5)
    w = x[: side * side].view(side, side)
    v = torch.ones(side)
    gemv = side * side * 4 / _best_time(lambda: torch.mv(w, v), reps) / 1e9
    del x, w
    gc.collect()
    return {"sum_read_GBps": read, "copy_read_write_GBps": copy, "gemv_read_GBps": gemv,
            "roofline_GBps": max(read, gemv)}


# ----------------------------------------------------------------------------------------------- engines


class GlmserveEngine:
    name = "glmserve"

    def __init__(self, directory: Path, max_batch: int, prompt_len: int, max_new_tokens: int):
        from glmserve import LLM, SamplingParams

        self._params = SamplingParams
        block = 16
        blocks_per_seq = -(-(prompt_len + max_new_tokens) // block)
        # Prefix caching off: every repetition sends the same prompts, and a cache hit would skip the prefill.
        self.llm = LLM(model=str(directory), num_kv_blocks=max_batch * blocks_per_seq + 16, max_num_seqs=max_batch,
                       max_num_batched_tokens=max(2048, max_batch * prompt_len), enable_prefix_caching=False)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = self._params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outputs]


class TransformersEngine:
    name = "transformers"

    def __init__(self, directory: Path, **_):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        self.model.eval()
        # Ignore EOS the way glmserve's ignore_eos does: no EOS at all (min_new_tokens would mask EOS logits and
        # could change the greedy choice).
        self.pad = self.model.generation_config.pad_token_id
        self.model.generation_config.eos_token_id = None
        self.implementation = {"attn_implementation": self.model.config._attn_implementation,
                               "experts_implementation": getattr(self.model.config, "_experts_implementation", None)}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_tokens, pad_token_id=self.pad)
        tokens = out[:, ids.shape[1]:].tolist()
        if any(len(t) != max_tokens for t in tokens):
            raise RuntimeError("transformers stopped early; EOS was not ignored")
        return tokens


def timed(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    gc.collect()
    t0 = time.perf_counter()
    tokens = engine.generate(prompts, max_tokens)
    return time.perf_counter() - t0, tokens


def wait_quiet(max_other: float, max_wait_s: float) -> None:
    """Sleep in 1 s windows until other processes use at most max_other cores (or max_wait_s has passed)."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        busy, own, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        time.sleep(1.0)
        if (_busy_cpu_s() - busy) - (_own_cpu_s() - own) <= max_other * (time.perf_counter() - t0):
            return


def measure_pair(engine, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float, list[list[int]], float]:
    """(prefill seconds, full-run seconds, tokens, cores other processes used meanwhile). Other processes' CPU
    use comes from /proc/stat over both runs together (clock-tick resolution needs the longer window)."""
    busy, own, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    prefill, _ = timed(engine, prompts, 1)
    total, tokens = timed(engine, prompts, max_new_tokens)
    other = ((_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / (time.perf_counter() - t0)
    return prefill, total, tokens, max(other, 0.0)


# ----------------------------------------------------------------------------------------------- profiling


def profile_glmserve(engine: GlmserveEngine, prompts: list[list[int]], max_tokens: int, top: int = 25) -> str:
    """torch.profiler over the decode steps only (engine.step() after the prefill step) and cProfile of a whole
    `LLM.generate` (Python side: scheduler, sampler, detokenization)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    lines = []
    eng = engine.llm.engine
    params = engine._params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def decode_steps(prof=None) -> tuple[int, float]:
        """Prefill all prompts, then run the decode steps alone (timed, optionally profiled)."""
        for i, p in enumerate(prompts):
            eng.add_request(f"profile-{i}", p, params)
        while any(len(o.new_token_ids) == 0 for o in eng.step()):  # until the prefill step has sampled
            pass
        if prof is not None:
            prof.start()
        steps, t0 = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.stop()
        return steps, wall

    steps, wall = decode_steps()
    lines.append(f"decode (engine.step() loop, no detokenization): {steps} steps, {wall / steps * 1e3:.2f} ms/step "
                 f"= {len(prompts) * steps / wall:.1f} tok/s")
    prof = profile(activities=[ProfilerActivity.CPU])
    steps, wall = decode_steps(prof)
    lines.append(f"torch.profiler over the decode steps ({wall / steps * 1e3:.2f} ms/step under the profiler):")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate(prompts, max_tokens)
    profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(top)
    lines.append("cProfile of one whole LLM.generate (prefill + decode), by own time:")
    lines.append(buf.getvalue())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a),
                                                                                                         len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-57m", help=f"a named shape ({', '.join(SHAPES)}) or a checkpoint dir")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per engine and batch; medians are reported")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, as BENCH.md)")
    ap.add_argument("--engines", nargs="+", default=["glmserve", "transformers"],
                    choices=["glmserve", "transformers"])
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "GLMSERVE_BENCH_CACHE", Path.home() / ".cache" / "glmserve-bench")))
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random prompts")
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the 1 GiB bandwidth measurement")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, profile one glmserve run per batch size (torch.profiler + cProfile)")
    ap.add_argument("--max-other-load", type=float, default=0.25,
                    help="remeasure when other processes used more than this many cores meanwhile (default 0.25)")
    ap.add_argument("--retries", type=int, default=3, help="remeasurements per measurement (default 3)")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each measurement, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 2:
        ap.error("--max-new-tokens must be at least 2 (decode time is full run minus a max_tokens=1 run)")

    torch.set_num_threads(args.threads)
    revision = _glmserve_revision()
    directory = prepare_checkpoint(args.model, args.cache_dir)
    num_tokens, eos = check_token_ids(directory)
    params = count_params(directory)

    engines = []
    if "transformers" in args.engines:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: measuring glmserve only", file=sys.stderr)
            args.engines = [e for e in args.engines if e != "transformers"]
    t0 = time.perf_counter()
    if "glmserve" in args.engines:
        engines.append(GlmserveEngine(directory, max(args.batch), args.prompt_len, args.max_new_tokens))
    if "transformers" in args.engines:
        engines.append(TransformersEngine(directory))
    load_s = time.perf_counter() - t0

    bandwidth_runs = [] if args.no_bandwidth else [measure_bandwidth()]

    # Random BPE token ids (below the tokenizer's added tokens, which are all GLM-4.5 special/markup tokens).
    from glmserve.testing.tokenizer import GLM45_ADDED_TOKENS

    rng = random.Random(args.seed)
    plain = num_tokens - len(GLM45_ADDED_TOKENS)
    all_prompts = [[rng.randrange(plain) for _ in range(args.prompt_len)] for _ in range(max(args.batch))]

    print(f"checkpoint {args.model}: {directory}")
    print(f"  params {params['total'] / 1e6:.1f}M total, {params['non_embedding'] / 1e6:.1f}M non-embedding, "
          f"{params['per_decode_token'] / 1e6:.1f}M read per decode token "
          f"({params['per_decode_token'] * 4 / 1e6:.0f} MB fp32, lm_head {params['lm_head'] / 1e6:.1f}M)")
    print(f"  torch {torch.__version__}, {args.threads} threads, engines loaded in {load_s:.1f}s; glmserve "
          f"{(revision.get('commit') or '?')[:7]}{' + local changes' if revision.get('modified') else ''}", flush=True)
    load_before = os.getloadavg()
    busy_before, own_before, wall_before = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()

    results = []
    for b in args.batch:
        prompts = all_prompts[:b]
        for engine in engines:  # warm-up: first-call allocations, lazy inits
            engine.generate(prompts, 4)
        runs = {e.name: {"prefill_s": [], "total_s": [], "decode_tps": [], "other_cores": [], "contended": [],
                          "retries": 0, "discarded": []}
                for e in engines}
        tokens = {}
        for rep in range(args.reps):
            order = engines if rep % 2 == 0 else engines[::-1]
            for engine in order:
                for attempt in range(args.retries + 1):
                    wait_quiet(args.max_other_load, args.quiet_wait)
                    prefill, total, out, other = measure_pair(engine, prompts, args.max_new_tokens)
                    if other <= args.max_other_load or attempt == args.retries:
                        break
                    runs[engine.name]["discarded"].append(
                        {"prefill_s": prefill, "total_s": total, "other_cores": other,
                         "decode_tps": b * (args.max_new_tokens - 1) / (total - prefill)})
                    print(f"  batch {b:3d} rep {rep + 1}/{args.reps} {engine.name:12s} other processes used "
                          f"{other:.2f} cores: measuring again", flush=True)
                rate = b * (args.max_new_tokens - 1) / (total - prefill)
                r = runs[engine.name]
                r["prefill_s"].append(prefill)
                r["total_s"].append(total)
                r["decode_tps"].append(rate)
                r["other_cores"].append(other)
                r["contended"].append(other > args.max_other_load)
                r["retries"] += attempt
                if engine.name in tokens and tokens[engine.name] != out:
                    print(f"  WARNING: {engine.name} greedy output changed between repetitions", file=sys.stderr)
                tokens.setdefault(engine.name, out)
                print(f"  batch {b:3d} rep {rep + 1}/{args.reps} {engine.name:12s} prefill {prefill * 1e3:8.1f} ms  "
                      f"total {total:7.2f} s  decode {rate:8.1f} tok/s  (others: {other:.2f} cores)", flush=True)
        entry = {"batch": b}
        for name, r in runs.items():
            # Medians over the measurements no other process disturbed (all of them if none was clean).
            clean = [i for i, c in enumerate(r["contended"]) if not c] or list(range(len(r["contended"])))
            entry[name] = {**r, "median_prefill_s": statistics.median(r["prefill_s"][i] for i in clean),
                           "median_decode_tps": statistics.median(r["decode_tps"][i] for i in clean),
                           "measurements_in_median": len(clean)}
        if len(tokens) == 2:
            g, t = tokens["glmserve"], tokens["transformers"]
            diverge = [first_divergence(x, y) for x, y in zip(g, t)]
            entry["greedy_mismatched_sequences"] = sum(d is not None for d in diverge)
            entry["greedy_mismatched_tokens"] = sum(x != y for gs, ts in zip(g, t) for x, y in zip(gs, ts))
            entry["first_divergence"] = diverge
            entry["ratio"] = entry["glmserve"]["median_decode_tps"] / entry["transformers"]["median_decode_tps"]
        results.append(entry)

    load_after = os.getloadavg()
    bandwidth = None
    if not args.no_bandwidth:  # again after the engines ran; the host's bandwidth varies: keep the best of each
        bandwidth_runs.append(measure_bandwidth())
        bandwidth = {k: max(run[k] for run in bandwidth_runs) for k in bandwidth_runs[0]}
        bandwidth["runs"] = bandwidth_runs
    # CPU-seconds that other processes used while we measured, per wall second: 0 on a quiet machine; the share
    # of the 2 cores others took from the engines.
    other_cores = ((_busy_cpu_s() - busy_before) - (_own_cpu_s() - own_before)) / (time.perf_counter() - wall_before)
    roofline = None
    if bandwidth is not None:
        bytes_per_token = params["per_decode_token"] * 4
        roofline = {"bytes_per_decode_token": bytes_per_token,
                    "batch1_tps": bandwidth["roofline_GBps"] * 1e9 / bytes_per_token}

    # ------------------------------------------------------------------------------------------- report
    names = [e.name for e in engines]
    print()
    print(f"== {args.model}: {args.prompt_len}-token prompts, {args.max_new_tokens} new tokens, greedy, "
          f"{args.threads} threads, median of {args.reps} ==")
    header = "batch"
    for n in names:
        header += f" | {n} prefill ms | {n} decode tok/s"
    if len(names) == 2:
        header += " | ratio glm/hf | greedy mismatches (seqs)"
    print(header)
    for entry in results:
        row = f"{entry['batch']:5d}"
        for n in names:
            row += f" | {entry[n]['median_prefill_s'] * 1e3:10.1f} | {entry[n]['median_decode_tps']:10.1f}"
        if len(names) == 2:
            row += f" | {entry['ratio']:8.2f}x | {entry['greedy_mismatched_sequences']}/{entry['batch']}"
        contended = sum(sum(entry[n]["contended"]) for n in names)
        if any(all(entry[n]["contended"]) for n in names):
            row += "   (WARNING: every measurement of an engine was disturbed by other processes)"
        elif contended:
            row += f"   ({contended} disturbed measurement(s) left out of the medians)"
        print(row)
    print(f"other processes used {max(other_cores, 0):.2f} of {os.cpu_count()} cores during the measurement "
          f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    if bandwidth is not None:
        print(f"bandwidth (1 GiB fp32): sum {bandwidth['sum_read_GBps']:.1f} GB/s read, GEMV "
              f"{bandwidth['gemv_read_GBps']:.1f} GB/s read, copy {bandwidth['copy_read_write_GBps']:.1f} GB/s "
              f"read+write")
        print(f"batch-1 roofline: {roofline['bytes_per_decode_token'] / 1e6:.0f} MB/token at "
              f"{bandwidth['roofline_GBps']:.1f} GB/s = {roofline['batch1_tps']:.0f} tok/s")
        one = next((e for e in results if e["batch"] == 1), None)
        if one is not None and "glmserve" in one:
            roofline["glmserve_batch1_fraction"] = one["glmserve"]["median_decode_tps"] / roofline["batch1_tps"]
            print(f"glmserve batch-1 decode = {roofline['glmserve_batch1_fraction']:.0%} of the roofline")

    if args.json:
        import tokenizers

        versions = {"python": platform.python_version(), "torch": torch.__version__,
                    "tokenizers": tokenizers.__version__}
        try:
            import transformers

            versions["transformers"] = transformers.__version__
        except ImportError:
            pass
        cfg = json.loads((directory / "config.json").read_text())
        report = {
            "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                        "torch_threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
            "versions": versions,
            "glmserve_revision": revision,
            "checkpoint": {"name": args.model, "config": {k: cfg[k] for k in _CONFIG_KEYS if k in cfg},
                           "params": params, "tokenizer_tokens": num_tokens, "eos_token_id": eos},
            "workload": {"prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "greedy": True,
                         "ignore_eos": True, "reps": args.reps, "prompt_seed": args.seed,
                         "glmserve_prefix_caching": False},
            "transformers_impl": next((e.implementation for e in engines if e.name == "transformers"), None),
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "other_processes_cores": other_cores,
            "bandwidth": bandwidth,
            "roofline": roofline,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")

    if args.profile:
        glm = next((e for e in engines if e.name == "glmserve"), None)
        if glm is not None:
            for b in args.batch:
                print(f"\n== profile: glmserve, batch {b}, {args.max_new_tokens} new tokens ==")
                print(profile_glmserve(glm, all_prompts[:b], args.max_new_tokens))
    return 0


_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                "num_experts_per_tok", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group",
                "use_qk_norm", "vocab_size", "max_position_embeddings", "num_nextn_predict_layers",
                "rope_parameters", "tie_word_embeddings", "dtype")


def _glmserve_revision() -> dict:
    """The commit this glmserve was imported from and its locally modified files (read-only git queries)."""
    import subprocess

    import glmserve

    root = Path(glmserve.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "glmserve"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head or None, "modified": [line[3:] for line in dirty]}


def _busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot (/proc/stat); 0 where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
