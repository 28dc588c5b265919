"""The embedded model's held-out rates with each KV cache dtype, paired request by request.

    python benchmarks/kv_cache_heldout.py --seeds 1000 2000 3000 --per-kind 500 \
        --output-json benchmarks/results/kv-cache-heldout.json

Every dtype answers the same held-out requests (`glmserve.nano.evaluate`'s cases, scored by its `score`) through
`glmserve serve --kv-cache-dtype DTYPE`. Per rate: each dtype's rate, the difference from the first dtype with its
paired standard error (the same requests answered twice, so only the requests whose check changed count), and the
fraction of requests whose replies (reasoning, content and tool calls) are identical to the first dtype's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from glmserve.bench.host import cpu_name, glmserve_revision, write_results
from glmserve.nano.evaluate import KINDS, RATES, heldout_cases, score, serve_and_chat

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "glmserve" / "models" / "glm-4.5-nano"


def paired_difference(base: list[bool], other: list[bool]) -> tuple[float, float]:
    """(mean of other - base, its standard error) over paired outcomes."""
    n = len(base)
    diffs = [int(b) - int(a) for a, b in zip(base, other, strict=True)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)


def _reply_text(reasoning, content, calls) -> tuple:
    """What a reply says, without the per-request tool-call ids."""
    return reasoning, content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def compare(outcomes: dict[str, dict[str, list[bool]]], replies: dict[str, dict[str, list]],
            dtypes: list[str]) -> dict:
    """Per rate: each dtype's rate, and for the other dtypes the paired difference from the first and its
    standard error; per kind: the fraction of replies identical to the first dtype's."""
    base = dtypes[0]
    rates = {}
    for name, (kind, check) in RATES.items():
        key = f"{kind}/{check}"
        if key not in outcomes[base]:
            continue
        row = {"n": len(outcomes[base][key])}
        for dtype in dtypes:
            row[dtype] = sum(outcomes[dtype][key]) / row["n"]
        for dtype in dtypes[1:]:
            diff, stderr = paired_difference(outcomes[base][key], outcomes[dtype][key])
            row[f"{dtype}_minus_{base}"], row[f"{dtype}_minus_{base}_stderr"] = diff, stderr
        rates[name] = row
    identical = {dtype: {kind: sum(a == b for a, b in zip(replies[base][kind], replies[dtype][kind]))
                         / len(replies[base][kind]) for kind in replies[base]}
                 for dtype in dtypes[1:]}
    return {"rates": rates, "identical_replies": identical}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--per-kind", type=int, default=300)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8"], help="the first is the baseline")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--output-json")
    args = p.parse_args(argv)

    examples = []  # (kind, example) over every seed
    for seed in args.seeds:
        cases = heldout_cases(seed, args.per_kind, tuple(args.kinds))
        examples += [(kind, example) for kind in args.kinds for example in cases[kind]]
    outcomes: dict[str, dict[str, list[bool]]] = {}
    replies: dict[str, dict[str, list]] = {}
    seconds = {}
    # A dtype named twice is run twice ("auto", "auto#2"): what a rerun alone changes (batching order).
    labels = [d if d not in args.kv_cache_dtypes[:i] else f"{d}#{i + 1}" for i, d in enumerate(args.kv_cache_dtypes)]
    for label, dtype in zip(labels, args.kv_cache_dtypes):
        start = time.perf_counter()
        answers = serve_and_chat(args.model, [e for _, e in examples], args.max_tokens, args.threads,
                                 args.concurrency, server_args=("--kv-cache-dtype", dtype))
        seconds[label] = round(time.perf_counter() - start, 1)
        outcomes[label], replies[label] = {}, {}
        for (kind, example), answer in zip(examples, answers):
            replies[label].setdefault(kind, []).append(_reply_text(*answer))
            for check, ok in score(kind, example, *answer).items():
                outcomes[label].setdefault(f"{kind}/{check}", []).append(ok)
        print(f"{label}: {len(examples)} requests in {seconds[label]} s", flush=True)

    result = {"model": args.model, "seeds": args.seeds, "per_kind": args.per_kind, "kinds": args.kinds,
              "kv_cache_dtypes": args.kv_cache_dtypes, "concurrency": args.concurrency, "threads": args.threads,
              "seconds": seconds, "cpu": cpu_name(), "revision": glmserve_revision(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              **compare(outcomes, replies, labels)}
    print(json.dumps({"rates": result["rates"], "identical_replies": result["identical_replies"]}, indent=1))
    if args.output_json:
        write_results(Path(args.output_json), result)


if __name__ == "__main__":
    main()
