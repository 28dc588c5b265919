"""Where an FP8 (e4m3) KV cache loses the embedded model's direct-arithmetic answers, and what exact rewrites of the
stored keys win back: a study on the fp32 cache, paired request by request.

    python benchmarks/kv_cache_precision.py --seeds 1000 2000 3000 4000 5000 6000 7000 8000 --per-kind 1000 \
        --output-json benchmarks/results/kv-cache-precision.json

Every variant answers the same held-out non-thinking arithmetic requests (`glmserve.nano.evaluate`'s cases and
check) with the offline engine, greedy. The cache stays fp32; a variant rounds what is stored through e4m3 and widens
it back, so each one isolates one error:
- `fp8`: keys and values rounded (what `--kv-cache-dtype fp8` stores, scale 1.0: the same replies byte for byte);
- `fp8_keys`, `fp8_values`: only one of the two rounded;
- `fp8_keys_centered`: keys rounded after subtracting each channel's mean over the first keys written (a constant
  per channel shifts every score of a query by the same amount, so attention is unchanged in exact arithmetic);
- `fp8_keys_rotated`: keys rounded in a Hadamard-rotated basis (q.k = Hq.Hk) and rotated back;
- `fp8_after_step`: a step attends to its own keys and values exact, earlier ones rounded (as SGLang's extend
  attention reads a chunk's new tokens unquantized);
- `int8_per_token`: for comparison, a one-byte integer format with a scale per token and head (|x|max / 127, as
  llama.cpp's q8_0 cache has one per 32 values), keys and values.
Per variant: the rate, its paired difference from `exact` with the standard error, and the identical replies.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from kv_cache_heldout import paired_difference

from glmserve.bench.host import cpu_name, glmserve_revision, write_results
from glmserve.layers.attention.kv_cache import PagedKVCache
from glmserve.llm import LLM
from glmserve.nano.evaluate import heldout_cases, score
from glmserve.types import SamplingParams

VARIANTS = ("exact", "fp8", "fp8_keys", "fp8_values", "fp8_keys_centered", "fp8_keys_rotated", "fp8_after_step",
            "int8_per_token")
E4M3 = torch.float8_e4m3fn
KIND = "arithmetic_direct"  # the one rate outside a point (BENCHMARKS.md, issue 23)


def rounded(x: torch.Tensor) -> torch.Tensor:
    limit = torch.finfo(E4M3).max
    return x.clamp(-limit, limit).to(E4M3).to(x.dtype)


def rounded_int8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round() * scale


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    if h.shape[0] != n:
        raise ValueError(f"head_dim {n} is not a power of two")
    return h / n**0.5


class RoundingWrites:
    """PagedKVCache.write replaced, for one variant, by one that rounds what it stores."""

    def __init__(self, variant: str):
        self.variant = variant
        self.key_means: dict[int, torch.Tensor] = {}
        self.last_slots: dict[int, torch.Tensor] = {}
        self.original = PagedKVCache.write

    def __enter__(self):
        study = self

        def write(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
            k, v = study.stored(cache, k, v, slot_mapping)
            study.original(cache, k, v, slot_mapping)

        PagedKVCache.write = write
        return self

    def __exit__(self, *exc):
        PagedKVCache.write = self.original

    def stored(self, cache, k, v, slot_mapping):
        variant = self.variant
        if variant in ("fp8", "fp8_keys"):
            k = rounded(k)
        if variant in ("fp8", "fp8_values"):
            v = rounded(v)
        if variant == "fp8_keys_centered":
            mean = self.key_means.setdefault(id(cache), k.mean(0))
            k = rounded(k - mean) + mean
        if variant == "fp8_keys_rotated":
            h = hadamard(k.shape[-1]).to(k.dtype)
            k = rounded(k @ h) @ h.T
        if variant == "int8_per_token":
            k, v = rounded_int8(k), rounded_int8(v)
        if variant == "fp8_after_step":  # round what the previous step wrote; this step's stay exact for now
            earlier = self.last_slots.get(id(cache))
            if earlier is not None:
                cache.k[earlier] = rounded(cache.k[earlier])
                cache.v[earlier] = rounded(cache.v[earlier])
            self.last_slots[id(cache)] = slot_mapping.clone()
        return k, v


def answer(examples, variant: str, max_tokens: int) -> list[str]:
    llm = LLM()
    with RoundingWrites(variant):
        outputs = llm.generate([e.prompt for e in examples], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].text for o in outputs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--per-kind", type=int, default=400)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    examples = [e for seed in args.seeds for e in heldout_cases(seed, args.per_kind, (KIND,))[KIND]]
    variants = ["exact", *(v for v in args.variants if v != "exact")]
    texts, correct = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        texts[variant] = answer(examples, variant, args.max_tokens)
        # An offline reply is the raw text: the non-thinking arithmetic check reads its last number.
        correct[variant] = [score(KIND, e, None, t, [])["correct"] for e, t in zip(examples, texts[variant])]
        print(f"{variant}: {sum(correct[variant]) / len(examples):.2%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = {}
    for variant in variants:
        diff, stderr = paired_difference(correct["exact"], correct[variant])
        identical = sum(a == b for a, b in zip(texts["exact"], texts[variant])) / len(examples)
        rows[variant] = {"rate": sum(correct[variant]) / len(examples), "minus_exact": diff, "stderr": stderr,
                         "identical": identical}
        print(f"{variant:20s} {rows[variant]['rate']:.2%}  {100 * diff:+.2f} points ({100 * stderr:.2f})  "
              f"identical {identical:.1%}")
    if args.output_json:
        write_results(args.output_json, {"cpu": cpu_name(), "glmserve": glmserve_revision(), "kind": KIND,
                                         "seeds": args.seeds, "per_kind": args.per_kind, "n": len(examples),
                                         "variants": rows})


if __name__ == "__main__":
    main()
