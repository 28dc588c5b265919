#!/usr/bin/env python
"""Structured output costs: grammar compile times, the per-token mask cost, and engine step time with 8
constrained requests beside 8 unconstrained ones.

* compile: each JSON schema of glmserve.testing.structured_cases and one GLM tool-call grammar, cold (a fresh
  compiler) and cached, for the embedded model's 2,048-token vocabulary and for a synthetic 151,552-token
  byte-level one (GLM-4.5's size; no real GLM-4.5 tokenizer is on this machine).
* mask: per constrained token, `fill_next_token_bitmask` (one matcher, walking a generated JSON) and the bitmask
  applied to one row of logits (xgrammar's CPU kernel, and glmserve's torch version, which the engine uses),
  both vocabularies.
* step: the embedded model, greedy, 8 unconstrained requests alone, with 8 more unconstrained ones, and with 8
  JSON-schema requests in the same batch (alternating); step times over the steps where all 8 (or 16) decode, and
  the runner's own grammar work in them (mask fill and apply, matcher advance). The unconstrained outputs are
  checked equal.
Micro-timings are the fastest of many calls: other processes on a shared machine only ever add time.

Example:
    python benchmarks/structured_output.py --json benchmarks/results/structured-output-nano.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import random
import statistics
import string
import threading
import time

import torch
import xgrammar as xgr

from glmserve.config import EngineConfig
from glmserve.engine import model_runner
from glmserve.engine.grammar import StructuredOutputManager
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.token_bitmask import apply_token_bitmask
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.structured_output import GrammarSpec, StructuredOutputCompiler
from glmserve.serving.tokenizer import Tokenizer
from glmserve.serving.tool_grammar import tool_call_grammar
from glmserve.testing.structured_cases import JSON_SCHEMAS, random_tools
from glmserve.types import SamplingParams

BIG_VOCAB = 151552


class SyntheticTokenizer:
    """Just what StructuredOutputCompiler reads: a byte-level vocabulary of BIG_VOCAB tokens (the 256 bytes, then
    random letter runs with and without a leading space, then GLM's markup tokens)."""

    def __init__(self, real: Tokenizer):
        rng = random.Random(0)
        byte_chars = [real.id_to_token(i) for i in range(256)]
        markup = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                  "</arg_value>", "<|user|>", "<|endoftext|>"]
        vocab = dict.fromkeys(byte_chars)
        while len(vocab) < BIG_VOCAB - len(markup):
            word = "".join(rng.choices(string.ascii_letters + string.digits + "_{}\":,", k=rng.randint(2, 9)))
            vocab.setdefault(("Ġ" if rng.random() < 0.5 else "") + word)
        self._vocab = {token: i for i, token in enumerate(list(vocab) + markup)}
        self.special_token_ids = frozenset({self._vocab["<|user|>"], self._vocab["<|endoftext|>"]})
        self.eos_token_id = self._vocab["<|endoftext|>"]
        self._backend = real.backend_json()

    def vocab(self):
        return self._vocab

    def backend_json(self):
        return self._backend

    def token_to_id(self, token):
        return self._vocab.get(token)


def _ms(fn, reps: int = 1) -> float:
    """The fastest of `reps` calls, in ms: other processes on a shared machine only ever add time."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def compile_times(tokenizer, vocab_size: int) -> dict:
    tools = tool_call_grammar(random_tools(0, 5), None, True, True)
    specs = [GrammarSpec("json_schema", s, "bench") for s in JSON_SCHEMAS] + [tools]
    start = time.perf_counter()
    compiler = StructuredOutputCompiler(tokenizer)
    compiler.compile_now(GrammarSpec("regex", "a", "bench"), vocab_size)  # builds the tokenizer info
    setup_ms = (time.perf_counter() - start) * 1e3
    cold = [_ms(lambda s=s: compiler.compile_now(s, vocab_size)) for s in specs]
    cached = [_ms(lambda s=s: compiler.compile_now(s, vocab_size), 5) for s in specs]
    return {"tokenizer_info_ms": round(setup_ms, 1),
            "json_schema_cold_ms_median": round(statistics.median(cold[:-1]), 2),
            "json_schema_cold_ms_max": round(max(cold[:-1]), 2), "tool_calls_5_tools_cold_ms": round(cold[-1], 2),
            "cached_ms_median": round(statistics.median(cached), 3)}


def compile_beside_python(tokenizer, vocab_size: int) -> dict:
    """How much Python work another thread gets done while a large schema compiles (xgrammar releases the GIL
    while compiling): loop iterations per ms during the compile, against alone."""
    big = {"type": "object", "properties": {f"p{i}": {"type": "object", "properties": {
        "x": {"type": "array", "items": {"type": "string", "pattern": "[a-z]{3,9}"}},
        "y": {"enum": [str(v) for v in range(50)]}}} for i in range(60)}}
    compiler = StructuredOutputCompiler(tokenizer)
    compiler.compile_now(GrammarSpec("regex", "a", "bench"), vocab_size)
    done = threading.Event()

    def spin() -> float:
        count, start = 0, time.perf_counter()
        while not done.is_set():
            count += 1
        return count / ((time.perf_counter() - start) * 1e3)

    worker = threading.Thread(target=lambda: (compiler.compile_now(GrammarSpec("json_schema", big, "b"), vocab_size),
                                              done.set()))
    worker.start()
    during = spin()
    worker.join()
    done.clear()
    threading.Timer(0.2, done.set).start()
    alone = spin()
    return {"loop_iterations_per_ms_during_compile": round(during), "alone": round(alone)}


def mask_costs(tokenizer, vocab_size: int) -> dict:
    compiler = StructuredOutputCompiler(tokenizer)
    schema = JSON_SCHEMAS[14]
    constraint = compiler.compile_now(GrammarSpec("json_schema", schema, "bench"), vocab_size)
    text = '{"items": [{"sku": "ABC", "qty": 12}, {"sku": "XYZ", "qty": 3}]}'
    matcher = xgr.GrammarMatcher(constraint.compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    fills = []
    for ch in text:  # one fill per character: the states a JSON walk goes through
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        fills.append(time.perf_counter() - start)
        assert matcher.accept_string(ch)
    logits, rows = torch.randn(8, vocab_size), bitmask.expand(8, -1).contiguous()
    kernel = _ms(lambda: xgr.apply_token_bitmask_inplace(logits, rows, indices=[3], backend="cpu"), 200)
    torch_version = _ms(lambda: apply_token_bitmask(logits, rows, [3]), 200)
    return {"fill_us_median": round(statistics.median(fills) * 1e6, 1), "fill_us_max": round(max(fills) * 1e6, 1),
            "apply_one_row_us_xgrammar_cpu_kernel": round(kernel * 1e3, 1),
            "apply_one_row_us_glmserve_torch": round(torch_version * 1e3, 1)}


class TimedManager(StructuredOutputManager):
    """The engine's grammar work (bitmask fill, the runner's apply, matcher advance), timed per step."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        apply = model_runner.apply_token_bitmask
        model_runner.apply_token_bitmask = lambda *args: self._timed(apply, *args)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds += time.perf_counter() - start
        return result

    def step_bitmask(self, *args):
        return self._timed(super().step_bitmask, *args)

    def accept(self, *args):
        self._timed(super().accept, *args)


def step_times(reps: int) -> dict:
    """The two configurations alternate, `reps` times each; a step is counted when the whole batch decodes."""
    tokenizer = Tokenizer(EMBEDDED_MODEL)
    engine = LLMEngine(EngineConfig(model=str(EMBEDDED_MODEL), num_kv_blocks=1024), progress=False)
    manager = engine.structured_output = TimedManager()
    compiler = StructuredOutputCompiler(tokenizer)
    vocab = engine.model_config.vocab_size
    constraints = [compiler.compile_now(GrammarSpec("json_schema", s, "bench"), vocab) for s in JSON_SCHEMAS[:8]]
    prompt = tokenizer.encode("[gMASK]<sop><|user|>\nDescribe a person.<|assistant|>\n<think></think>\n")
    plain = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    held = [SamplingParams(temperature=0.0, max_tokens=48, grammar=c) for c in constraints]
    configs = {"8_unconstrained": [], "16_unconstrained": [plain] * 8, "8_unconstrained_plus_8_constrained": held}
    steps = {label: [] for label in configs}
    grammar = {label: [] for label in configs}
    outputs = {label: None for label in configs}
    for rep in range(reps):
        for label, extra in configs.items():
            ids = {}
            for i in range(8):
                ids[f"{label}-{rep}-u{i}"] = []
                engine.add_request(f"{label}-{rep}-u{i}", prompt + [i + 10], plain)
            for i, params in enumerate(extra):
                engine.add_request(f"{label}-{rep}-c{i}", prompt, params)
            while engine.has_unfinished_requests():
                full = len(engine.scheduler.running) == 8 + len(extra) and engine.scheduler.num_waiting == 0
                manager.seconds = 0.0
                start = time.perf_counter()
                for out in engine.step():
                    if out.request_id in ids:
                        ids[out.request_id] += out.new_token_ids
                if full:
                    steps[label].append(time.perf_counter() - start)
                    grammar[label].append(manager.seconds)
            outputs[label] = [ids[k] for k in sorted(ids)]
    result = {label: {"step_ms_median": round(statistics.median(t) * 1e3, 2), "step_ms_min": round(min(t) * 1e3, 2),
                      "grammar_ms_per_step_median": round(statistics.median(grammar[label]) * 1e3, 3),
                      "steps": len(t)} for label, t in steps.items()}
    first, second, third = outputs.values()  # the 8 requests every configuration has
    result["unconstrained_outputs_identical"] = first == second == third
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    real = Tokenizer(EMBEDDED_MODEL)
    big = SyntheticTokenizer(real)
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "xgrammar": importlib.metadata.version("xgrammar")},
        "compile": {"vocab_2048": compile_times(real, 2048), f"vocab_{BIG_VOCAB}": compile_times(big, BIG_VOCAB)},
        "compile_beside_python": compile_beside_python(real, 2048),
        "mask": {"vocab_2048": mask_costs(real, 2048), f"vocab_{BIG_VOCAB}": mask_costs(big, BIG_VOCAB)},
        "step": step_times(args.reps),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
