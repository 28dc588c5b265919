"""Latency against throughput over the concurrency levels of a `glmserve bench serve` sweep, as a PNG."""

from __future__ import annotations

from pathlib import Path

from glmserve.bench.metrics import LATENCIES


def plot_sweep(results: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    throughput = [r["output_throughput"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), constrained_layout=True)
    for ax, name in zip(axes.flat, LATENCIES):
        ax.plot(throughput, [r[f"median_{name}_ms"] for r in results], "o-", label="median")
        ax.plot(throughput, [r[f"p99_{name}_ms"] for r in results], "s--", label="p99")
        for x, r in zip(throughput, results):
            ax.annotate(f"c={r['max_concurrency'] or 'inf'}", (x, r[f"median_{name}_ms"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output token throughput (tok/s)")
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.set_title(LATENCIES[name], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
