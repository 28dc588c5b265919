"""`glmserve bench serve`: online serving benchmark of any OpenAI-compatible server, with `vllm bench serve`'s
flags and report.

Requests stream over HTTP (httpx, SSE) and arrive as a Poisson process at `--request-rate` (all at once when it is
inf), at most `--max-concurrency` in flight. Several concurrency levels run one after another, each with prompts of
its own; `--plot` draws latency against throughput across them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help="the server's URL, e.g. http://127.0.0.1:8000 (default: from --host, --port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS)
    p.add_argument("--model", help="model name sent in requests (default: the first of the server's /v1/models)")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME",
                   help="adapter names the requests take in turn instead of --model (vLLM's picks one at random)")
    p.add_argument("--tokenizer", help="checkpoint directory whose tokenizer.json makes random prompts exact in "
                                       "tokens (default: the model's directory, if the server names a local one)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--dataset-name", default="random", choices=("random", "chat"),
                   help="random: random-word prompts; chat: multi-turn conversations from the embedded model's "
                        "held-out corpus, one request per assistant turn, with their tools")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--chat-output-len", type=int, default=256, help="max tokens of each chat-dataset reply")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[None],
                   help="most requests in flight; several values sweep them (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate every requested token (vLLM extension)")
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                   help='fields added to every request, e.g. \'{"return_token_ids": true}\' so that tokens with no '
                        'text yet (random weights, partial characters) still count as arrivals')
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                   help="service-level objectives for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--save-result", action="store_true", help="write the results as JSON")
    p.add_argument("--result-dir", default=".", help="where --save-result writes (default: the current directory)")
    p.add_argument("--result-filename", "--result-file", help="the JSON file (implies --save-result)")
    p.add_argument("--plot", metavar="PNG", help="plot latency against throughput across the concurrency levels")
    p.add_argument("--disable-tqdm", action="store_true")


async def _models(client, base_url: str) -> list[dict]:
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    return response.json()["data"]


async def _arrivals(requests: list, rate: float, rng: random.Random):
    for i, request in enumerate(requests):
        if i and rate != math.inf:
            await asyncio.sleep(rng.expovariate(rate))
        yield request


async def benchmark(client, url: str, bodies: list[dict], rate: float, max_concurrency: int | None, seed: int,
                    disable_tqdm: bool) -> tuple[list, float]:
    """One run over all requests: (their outputs in order, the wall-clock duration)."""
    from tqdm import tqdm

    from glmserve.bench.request import send_request

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(bodies), disable=disable_tqdm, desc=f"concurrency {max_concurrency or 'unlimited'}")

    async def one(body: dict):
        async with limit:
            output = await send_request(client, url, body)
        bar.update()
        return output

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(body)) async for body in _arrivals(bodies, rate, random.Random(seed))]
    outputs = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(outputs), duration


def _samples(args, chat: bool, tokenizer, num_prompts: int, seed: int) -> list:
    from glmserve.bench import datasets

    if args.dataset_name == "random":
        return datasets.random_requests(num_prompts, args.random_input_len, args.random_output_len, chat, tokenizer,
                                        seed)
    return datasets.chat_requests(num_prompts, args.chat_output_len, chat, seed)


async def _prepare(args, parser: argparse.ArgumentParser, client, base_url: str):
    """(model, tokenizer directory, tokenizer), both None without one, after a one-token test request passed."""
    from glmserve.bench.datasets import load_tokenizer
    from glmserve.bench.request import request_body, send_request

    models = await _models(client, base_url)
    card = next((m for m in models if m["id"] == args.model), {}) if args.model else models[0]
    model = args.model or card["id"]
    # vLLM's default tokenizer is the model's; a server on this machine names its directory (id or root).
    local = next((d for d in (model, card.get("root")) if d and Path(d, "tokenizer.json").is_file()), None)
    directory = args.tokenizer or local
    tokenizer = load_tokenizer(directory)
    if args.tokenizer and tokenizer is None:
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    chat = args.endpoint == "/v1/chat/completions"
    sample = _samples(args, chat, tokenizer, 1, seed=-1)[0]  # a prompt of its own: the runs' stay uncached
    test = await send_request(client, base_url + args.endpoint,
                              request_body(replace(sample, max_tokens=1), model, chat, args.ignore_eos))
    if not test.success:
        raise RuntimeError(f"the test request to {base_url + args.endpoint} failed: {test.error}")
    return model, directory if tokenizer else None, tokenizer


async def _run(args, parser: argparse.ArgumentParser) -> int:
    import httpx

    for name in ("httpx", "matplotlib"):  # glmserve logs at INFO: a line per request would bury the report
        logging.getLogger(name).setLevel(logging.WARNING)

    from glmserve.bench.metrics import calculate_metrics, format_report, format_sweep, parse_goodput
    from glmserve.bench.request import request_body

    try:
        goodput = parse_goodput(args.goodput)
    except ValueError as e:
        parser.error(str(e))
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    chat = args.endpoint == "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(6 * 3600.0), limits=limits) as client:
        try:
            model, tokenizer_dir, tokenizer = await _prepare(args, parser, client, base_url)
        except (httpx.HTTPError, KeyError, IndexError, ValueError, RuntimeError) as e:
            print(f"glmserve bench serve: {base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        exact = tokenizer is not None or args.dataset_name == "chat"
        print(f"model {model} at {base_url}{args.endpoint}: {args.dataset_name} dataset, {args.num_prompts} prompts"
              f"{'' if exact else ' (no tokenizer: input lengths are approximate)'}")
        results = []
        for i, level in enumerate(args.max_concurrency):
            # Each level gets prompts of its own, so that a prefix cache cannot reuse an earlier level's.
            names = args.lora_modules or [model]
            bodies = [request_body(s, names[j % len(names)], chat, args.ignore_eos) | args.extra_body
                      for j, s in enumerate(_samples(args, chat, tokenizer, args.num_prompts, args.seed + i))]
            outputs, duration = await benchmark(client, base_url + args.endpoint, bodies, args.request_rate, level,
                                                args.seed, args.disable_tqdm)
            metrics = calculate_metrics(outputs, duration, goodput)
            print(format_report(metrics, level, args.request_rate))
            if metrics["failed"]:
                print(f"first error: {next(e for e in metrics['errors'] if e)}", file=sys.stderr)
            results.append({"max_concurrency": level, **metrics})
    if len(results) > 1:
        print(format_sweep(results))
    _save(args, model, tokenizer_dir, results)
    if args.plot:
        from glmserve.bench.plot import plot_sweep

        plot_sweep(results, args.plot, f"{model} {args.endpoint}, {args.dataset_name} dataset, "
                                       f"{args.num_prompts} prompts")
        print(f"wrote {args.plot}")
    return 0 if all(r["failed"] == 0 for r in results) else 1


def _save(args, model: str, tokenizer_dir: str | None, results: list[dict]) -> None:
    if not (args.save_result or args.result_filename):
        return
    now = datetime.now()
    backend = "openai-chat" if args.endpoint == "/v1/chat/completions" else "openai"  # vLLM's backend names
    rate = args.request_rate if args.request_rate != math.inf else "inf"  # JSON has no infinity
    name = args.result_filename or f"{backend}-{rate}qps-{Path(model).name}-{now:%Y%m%d-%H%M%S}.json"
    path = Path(args.result_dir) / name
    report = {"date": now.strftime("%Y%m%d-%H%M%S"), "backend": backend, "endpoint": args.endpoint,
              "model_id": model, "tokenizer_id": tokenizer_dir, "dataset_name": args.dataset_name,
              "num_prompts": args.num_prompts, "request_rate": rate, "random_input_len": args.random_input_len,
              "random_output_len": args.random_output_len,
              "ignore_eos": args.ignore_eos, "seed": args.seed, "goodput": args.goodput, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def main(args, parser: argparse.ArgumentParser) -> int:
    return asyncio.run(_run(args, parser))
