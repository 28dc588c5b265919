"""compare_llamacpp.py --context: decode of one sequence at a long context, glmserve beside llama.cpp on one
checkpoint, for each engine's KV-cache types.

llama.cpp prefills the --context-token prompt once per KV type and saves that sequence's KV cache beside the GGUF
(llama_state_seq_save_file; minutes on 2 cores, and not what is compared); each timed repetition loads it back and
decodes --output-len tokens after it. glmserve's paged cache is filled with random keys and values instead, as
benchmarks/long_context.py does (attention's cost does not depend on their values), and each repetition times
--output-len - 1 decode steps of the whole model at that context. Decode tok/s is 1 / the median step of a
repetition; the figure reported is the median over repetitions. Only the timed repetitions hold --cpu-lock.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from peers.llamacpp import LlamaCppEngine

from glmserve.bench.host import OtherLoad, exclusive_lock
from glmserve.bench.pauses import Clock, PauseMeter

PREFILL_BATCH = 2048  # tokens per llama_decode call while prefilling


def llama_engines(args, gguf: Path) -> dict[str, LlamaCppEngine]:
    """One worker per llama.cpp KV type, each with a context of --context + --output-len tokens (and one spare)."""
    return {kv: LlamaCppEngine(f"llama.cpp-{gguf.stem.rsplit('-', 1)[-1]}-kv-{kv}", args.llama_python, gguf,
                               args.threads, 1, args.context + args.output_len + 1, PREFILL_BATCH,
                               extra_args=["--type-k", kv, "--type-v", kv, "--flash-attn", args.flash_attn])
            for kv in args.llama_kv_types}


def state_path(args, gguf: Path, kv: str) -> Path:
    return args.gguf_dir / f"{gguf.stem}-ctx{args.context}-kv-{kv}-fa-{args.flash_attn}-seed{args.seed}.state"


def ensure_states(args, gguf: Path, engines: dict[str, LlamaCppEngine], prompt: list[int]) -> dict[str, dict]:
    """Each KV type's prefilled state (prefilled now unless cached) and what its prefill took."""
    meter, states = PauseMeter(), {}
    for kv, engine in engines.items():
        path = state_path(args, gguf, kv)
        meta = path.with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            print(f"{engine.name}: prefilling {len(prompt)} tokens (saved to {path}) ...", flush=True)
            start = Clock(meter)
            reply = engine.request({"prefill": prompt, "save": str(path.with_suffix(".partial"))})
            clock = Clock(meter).since(start)
            path.with_suffix(".partial").rename(path)
            meta.write_text(json.dumps({**reply, **{f"parent_{k}": v for k, v in clock.items()},
                                        "prefill_tokens_per_active_s": len(prompt) / clock["active_s"],
                                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "context_params": engine.info["context_params"]}, indent=2) + "\n")
        states[kv] = {"path": str(path), **json.loads(meta.read_text())}
    meter.close()
    return states


def glmserve_runners(args, directory: Path) -> dict:
    """A model runner per glmserve KV-cache dtype, its pool holding --context + 64 blocks, filled with random K/V."""
    import torch
    from long_context import fill_caches

    from glmserve.config import EngineConfig, ModelConfig
    from glmserve.engine.model_runner import ModelRunner

    model_config, runners = ModelConfig.from_pretrained(directory), {}
    for kv in args.glmserve_kv_cache_dtypes:
        runner = ModelRunner(model_config, EngineConfig(model=str(directory), num_kv_blocks=-(-args.context // 16) + 64,
                                                        kv_cache_dtype=kv), progress=False)
        fill_caches(runner, torch.Generator().manual_seed(0))
        runners[f"glmserve-kv-{kv}"] = runner
    return runners


def measure(args, runners: dict, engines: dict[str, LlamaCppEngine], states: dict[str, dict]) -> dict:
    """--num-iters repetitions of every engine, alternating their order; per repetition the median step."""
    from long_context import decode_case

    from glmserve.layers.attention import get_attention_backend

    backend, rng = get_attention_backend(args.attention_backend), random.Random(0)
    names = list(runners) + [e.name for e in engines.values()]
    runs = {name: {"tokens_per_s": [], "median_step_s": [], "fastest_step_s": []} for name in names}
    pids = [p for e in engines.values() for p in e.pids]
    with exclusive_lock(args.cpu_lock):
        load = OtherLoad(pids)
        for rep in range(args.num_iters):
            order = list(runners.items()) + list(engines.items())
            for key, engine in order if rep % 2 == 0 else order[::-1]:
                if key in runners:
                    timing = decode_case(engine, backend, 1, args.context, args.output_len - 1, rng)
                    name, median, fastest = key, timing["step_s_median"], timing["step_s"]
                else:
                    reply = engine.request({"decode_from": states[key]["path"],
                                            "first_token": states[key]["first_token"], "max_tokens": args.output_len})
                    name, median, fastest = engine.name, statistics.median(reply["step_s"]), min(reply["step_s"])
                r = runs[name]
                r["tokens_per_s"].append(1 / median)
                r["median_step_s"].append(median)
                r["fastest_step_s"].append(fastest)
                print(f"  rep {rep + 1}/{args.num_iters} {name:28s} {1 / median:8.1f} tok/s "
                      f"(median step {median * 1e3:.2f} ms, fastest {fastest * 1e3:.2f} ms)", flush=True)
        other_cores = load.cores()
    for r in runs.values():
        r["median_tokens_per_s"] = statistics.median(r["tokens_per_s"])
    ratios = {f"{g} / {e.name}": runs[g]["median_tokens_per_s"] / runs[e.name]["median_tokens_per_s"]
              for g in runners for e in engines.values()}
    return {"engines": runs, "glmserve_over_llama_cpp": ratios, "other_cores_during_timing": other_cores,
            "glmserve_attention_backend": backend.name}


def report(args, result: dict, states: dict[str, dict]) -> str:
    lines = ["", f"== decode of 1 sequence after a {args.context}-token context, {args.output_len} tokens per "
                 f"repetition, {args.threads} threads, median of {args.num_iters} repetitions ==",
             "engine                       | decode tok/s | median step ms"]
    for name, r in result["engines"].items():
        lines.append(f"{name:28s} | {r['median_tokens_per_s']:12.1f} | "
                     f"{statistics.median(r['median_step_s']) * 1e3:14.2f}")
    lines += [f"{pair}: {ratio:.2f}x" for pair, ratio in result["glmserve_over_llama_cpp"].items()]
    for kv, s in states.items():
        lines.append(f"llama.cpp KV {kv}: prefill {s['prefill_s']:.0f} s wall, {s['parent_active_s']:.0f} s active, "
                     f"{s['prefill_cpu_s']:.0f} CPU s ({s['date']}); state {s['state_bytes'] / 2**20:.0f} MiB")
    lines.append(f"other processes used {result['other_cores_during_timing']:.2f} cores during the timed part")
    return "\n".join(lines)
