"""vLLM's serving metrics from the timed requests of one run, its result keys and its report layout."""

from __future__ import annotations

import numpy as np

from glmserve.bench.request import RequestFuncOutput

LATENCIES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
             "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
PERCENTILES = (90, 99)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """vLLM's `--goodput ttft:MS tpot:MS e2el:MS` service-level objectives, in ms."""
    slos = {}
    for item in items or ():
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput {item}: the metric must be ttft, tpot or e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item}: expected METRIC:MILLISECONDS") from None
    return slos


def _tpot(o: RequestFuncOutput) -> float:
    return (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0


def calculate_metrics(outputs: list[RequestFuncOutput], duration: float, goodput: dict[str, float]) -> dict:
    done = [o for o in outputs if o.success]
    values_ms = {"ttft": [o.ttft * 1e3 for o in done], "tpot": [_tpot(o) * 1e3 for o in done if o.output_tokens > 1],
                 "itl": [gap * 1e3 for o in done for gap in o.itl], "e2el": [o.latency * 1e3 for o in done]}
    good = sum(all({"ttft": o.ttft, "tpot": _tpot(o), "e2el": o.latency}[name] * 1e3 <= slo
                   for name, slo in goodput.items()) for o in done)
    total_input, total_output = sum(o.prompt_len for o in done), sum(o.output_tokens for o in done)
    metrics = {
        "duration": duration, "completed": len(done), "failed": len(outputs) - len(done),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "request_goodput": good / duration if goodput else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for name, values in values_ms.items():
        array = np.asarray(values or [0.0])
        metrics |= {f"mean_{name}_ms": float(array.mean()), f"median_{name}_ms": float(np.median(array)),
                    f"std_{name}_ms": float(array.std())}
        metrics |= {f"p{p}_{name}_ms": float(np.percentile(array, p)) for p in PERCENTILES}
    metrics |= {"input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_tokens for o in outputs],
                "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
                "e2els": [o.latency for o in outputs],
                "errors": [o.error for o in outputs]}
    return metrics


def format_report(m: dict, max_concurrency: int | None, request_rate: float) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Maximum request concurrency:", max_concurrency if max_concurrency else "unlimited")
    row("Request rate (req/s):", request_rate)
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    if m["request_goodput"] is not None:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for name, title in LATENCIES.items():
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", m[f"mean_{name}_ms"])
        row(f"Median {upper} (ms):", m[f"median_{name}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {upper} (ms):", m[f"p{p}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def format_sweep(results: list[dict]) -> str:
    """One line per concurrency level: the throughput-latency trade-off at a glance."""
    lines = [f"{'concurrency':>11} | {'req/s':>7} | {'out tok/s':>9} | {'TTFT ms':>8} | {'TPOT ms':>8} | "
             f"{'E2EL ms':>8}   (medians)"]
    for r in results:
        level = r["max_concurrency"] or "unlimited"
        lines.append(f"{level:>11} | {r['request_throughput']:7.2f} | {r['output_throughput']:9.1f} | "
                     f"{r['median_ttft_ms']:8.1f} | {r['median_tpot_ms']:8.1f} | {r['median_e2el_ms']:8.1f}")
    return "\n".join(lines)
