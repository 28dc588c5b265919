#!/usr/bin/env python
"""The native paged-attention kernel alone at decode: one layer's step over a long context, its KV bytes read per
second beside what a plain sum reads from the same pool, for each storage dtype, on 4 KiB pages (torch.zeros) and
on transparent huge pages (layers/attention/huge_pages.py, what PagedKVCache.allocate uses on the CPU).

The pool holds the contexts' blocks plus 64, at random places (a pool after some churn), with random values; the
head layout is bench-57m's (8 query heads on 2 KV heads of 64) unless given.

    python benchmarks/attention_kernel.py --output-json benchmarks/results/attention-kernel-32k.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

from glmserve.bench.host import OtherLoad, cpu_name, glmserve_revision, write_results
from glmserve.kernels import native
from glmserve.kernels.paged_attention import paged_attention
from glmserve.layers.attention.huge_pages import HUGE_PAGE, huge_page_zeros, thp_mode
from glmserve.layers.attention.kv_cache import KV_STORAGE_DTYPES

DTYPES = {"float32": torch.float32, **{k: v for k, v in KV_STORAGE_DTYPES.items() if v is not None}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-dtypes", nargs="+", default=["float32", "bfloat16", "fp8_e4m3"], choices=list(DTYPES))
    p.add_argument("--pages", nargs="+", default=["small", "huge"], choices=["small", "huge"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default=None, help="the kernel's ISA path (default: the fastest here)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per case (the fastest is kept)")
    p.add_argument("--output-json", type=Path)
    return p.parse_args(argv)


def fastest(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def case(args: argparse.Namespace, context: int, dtype: torch.dtype, pages: str, rng: random.Random) -> dict:
    need = -(-context // args.block_size)
    num_blocks = args.batch * need + 64
    shape = (num_blocks * args.block_size, args.kv_heads, args.head_dim)
    alloc = huge_page_zeros if pages == "huge" else (lambda s, d: torch.zeros(s, dtype=d))
    k, v = alloc(shape, dtype), alloc(shape, dtype)
    gen = torch.Generator().manual_seed(0)
    for cache in (k, v):
        for rows in cache.split(65536):
            rows.copy_(torch.randn(rows.shape, generator=gen).to(dtype))
    blocks = rng.sample(range(num_blocks), args.batch * need)
    tables = torch.tensor(blocks, dtype=torch.long).view(args.batch, need)
    q = torch.randn(args.batch, args.heads, args.head_dim)
    out = torch.empty_like(q)
    seq_lens = torch.full((args.batch,), context, dtype=torch.long)
    starts = torch.arange(args.batch + 1, dtype=torch.long)
    seconds = fastest(lambda: paged_attention(out, q, k, v, tables, args.block_size, seq_lens, starts,
                                              args.head_dim**-0.5, isa=args.isa), args.repeats)
    kv_bytes = 2 * args.batch * context * args.kv_heads * args.head_dim * dtype.itemsize
    flat_k, flat_v = k.view(torch.uint8).view(-1, 64).view(torch.int64), v.view(torch.uint8).view(-1, 64).view(
        torch.int64)
    sum_s = fastest(lambda: (flat_k.sum(), flat_v.sum()), 3)  # int64 sums: the same bytes at any storage dtype
    pool_bytes = k.numel() * dtype.itemsize  # huge_page_zeros keeps 4 KiB pages for a pool under one huge page
    return {"context": context, "batch": args.batch, "kv_dtype": str(dtype).removeprefix("torch."), "pages": pages,
            "on_huge_pages": pages == "huge" and pool_bytes >= HUGE_PAGE and thp_mode() in ("always", "madvise"),
            "kernel_ms": seconds * 1e3, "kv_bytes_read": kv_bytes, "kernel_GBps": kv_bytes / seconds / 1e9,
            "pool_sum_GBps": 2 * k.numel() * dtype.itemsize / sum_s / 1e9}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if native.extension() is None:
        raise SystemExit("the native extension is not available here")
    torch.set_num_threads(args.threads)
    other = OtherLoad()
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "host": cpu_name(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "thp": thp_mode(),
               "isa": args.isa or native.default_isa(),
               "glmserve_revision": glmserve_revision(), "load_average_at_start": os.getloadavg(), "cases": []}
    rng = random.Random(0)
    for context in args.contexts:
        for name in args.kv_dtypes:
            for pages in args.pages:
                row = case(args, context, DTYPES[name], pages, rng)
                results["cases"].append(row)
                print(f"{context:>7} {row['kv_dtype']:>14} {pages:>5} pages: {row['kernel_ms']:7.2f} ms, "
                      f"{row['kernel_GBps']:5.1f} GB/s (a plain sum of the pool: {row['pool_sum_GBps']:5.1f})",
                      flush=True)
    results["load_average_at_end"] = os.getloadavg()
    results["other_processes_cores"] = other.cores()
    if args.output_json:
        write_results(args.output_json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
