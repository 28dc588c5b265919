"""`glmserve bench serve` (an OpenAI-compatible server over HTTP, as `vllm bench serve`) and `glmserve bench
offline` (a checkpoint's prefill and decode throughput in-process, beside the memory-bandwidth roofline).

The flag definitions import nothing heavy: `glmserve serve` builds the same parser.
"""

from __future__ import annotations

import argparse

from glmserve.bench import offline, serve


def add_parsers(bench: argparse.ArgumentParser) -> None:
    commands = bench.add_subparsers(dest="bench_command", required=True)
    serve.add_cli_args(commands.add_parser("serve", help="benchmark a running OpenAI-compatible server",
                                           description=serve.__doc__, allow_abbrev=False,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    offline.add_cli_args(commands.add_parser("offline", help="offline prefill and decode throughput of a checkpoint",
                                             description=offline.__doc__, allow_abbrev=False,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))


def main(args, parser: argparse.ArgumentParser) -> int:
    return {"serve": serve.main, "offline": offline.main}[args.bench_command](args, parser)
