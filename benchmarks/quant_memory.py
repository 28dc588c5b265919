#!/usr/bin/env python
"""Memory per weight format (issue 20): a GLM-4.5-Air-shaped slice (hidden 4096, 96 q / 8 kv heads of 128, 128
routed experts top-8 + 1 shared, moe_intermediate 1408, vocab 151552; layer 0 dense, then MoE layers) built with
--load-format dummy, one fresh process per format, one format at a time: resident memory per parameter after
loading and the peak while loading. From the slice's measured resident / stored ratio and the exact bytes each
format stores for the full models (counted on the meta device), the memory GLM-4.5-Air and GLM-4.5 need.

    python benchmarks/quant_memory.py --output-json benchmarks/results/quant-memory-air-slice.json

A format whose slice would not fit in the memory available now is run with fewer MoE layers (the JSON says how
many); fp32 and fp16 storage, which load in fp32 (4 bytes per parameter), are only counted.
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import replace
from pathlib import Path

from glmserve.bench.host import write_results
from glmserve.bench.memory import AIR, GLM45, count_on_meta, measure

GIB = 2**30
MEASURED = ("int4", "int8", "fp8", "q4_0", "q8_0")
COUNTED = (None, *MEASURED)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def fitting_slice(method: str, moe_layers: int, headroom: float):
    """The slice with as many of the asked MoE layers as fit in the memory available now (None: not even one)."""
    for layers in range(moe_layers, 0, -1):
        shape = replace(AIR, num_hidden_layers=1 + layers)
        need = count_on_meta(shape, method)["stored_bytes"] * 1.2 + 2 * GIB
        if need <= available_bytes() * headroom:
            return shape
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--moe-layers", type=int, default=3, help="MoE layers after the dense layer 0 (issue: 3-5)")
    p.add_argument("--methods", nargs="+", default=list(MEASURED))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--headroom", type=float, default=0.8, help="share of the available memory a run may take")
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)

    slices: list[dict] = []
    for method in args.methods:
        shape = fitting_slice(method, args.moe_layers, args.headroom)
        if shape is None:
            print(f"{method}: not run, too little memory available ({available_bytes() / GIB:.1f} GiB)")
            continue
        result = {**measure(shape, method, args.threads), "moe_layers": shape.num_hidden_layers - 1}
        slices.append(result)
        print(f"{method}: {result['moe_layers']} MoE layers, {result['params'] / 1e9:.2f} B parameters, "
              f"{result['model_rss_per_param']:.3f} bytes/param resident after loading "
              f"({result['model_rss_bytes'] / GIB:.2f} GiB; stored {result['stored_bytes'] / GIB:.2f} GiB), "
              f"peak {(result['peak_rss_bytes'] - result['rss_before_bytes']) / GIB:.2f} GiB while loading",
              flush=True)
        if args.output_json:  # after every format: a long run stopped early keeps what it measured
            record_slices(args, slices)
    record_slices(args, slices, report=True)
    return 0


def record_slices(args: argparse.Namespace, slices: list[dict], report: bool = False) -> None:
    """The measured slices, and the full models' stored bytes x each format's measured resident / stored ratio."""
    ratio = {r["quantization"]: r["model_rss_bytes"] / r["stored_bytes"] for r in slices}
    full = []
    for name, shape in (("GLM-4.5-Air", replace(AIR, num_nextn_predict_layers=1)),
                        ("GLM-4.5", replace(GLM45, num_nextn_predict_layers=1))):
        for method in COUNTED:
            counted = count_on_meta(shape, method)
            resident = counted["stored_bytes"] * ratio.get(method or "none", 1.0)
            full.append({"model": name, "quantization": method or "none", "params": counted["params"],
                         "stored_gib": counted["stored_bytes"] / GIB, "estimated_resident_gib": resident / GIB})
            if report:
                print(f"{name} (with its MTP layer) {method or 'fp32'}: {counted['params'] / 1e9:.1f} B parameters, "
                      f"{counted['stored_bytes'] / GIB:.1f} GiB of weights, ~{resident / GIB:.1f} GiB resident")
    if args.output_json:
        write_results(args.output_json, {
            "host": platform.node(), "threads": args.threads, "slice": slices, "full_models": full,
            "note": "resident = RSS after loading - RSS before building the model (interpreter, torch); peak = "
                    "VmHWM while loading; full models: exact stored bytes x the slice's resident / stored ratio "
                    "(1 where not measured), weights only (no KV cache or activations)"})


if __name__ == "__main__":
    raise SystemExit(main())
