"""Measure a nano checkpoint on held-out conversations: `python -m glmserve.nano.evaluate --model DIR`.

The task rates are measured the way a user meets the model: `glmserve serve DIR` with the glm45 reasoning and
tool-call parsers runs as a subprocess, and the official `openai` client sends each held-out conversation (user
texts, arithmetic problems and tool schemas never in training) with its tools and thinking mode, greedily and
concurrently; the replies are scored from `tool_calls`, `content` and `reasoning_content`. The MTP rates are
teacher-forced offline on held-out conversations: next-next-token accuracy, and how often the MTP's greedy guess
equals the main model's (what greedy speculative decoding would accept). Prints the rates as JSON.

`tool_call_user` measures tools a user writes: realistic tools whose argument keys (`location`, `cityName`, ...) are
all held out (`arg_keys`), drawn from their own stream; `--tool-strict-level parameter` measures the same requests
with every tool held to its schema by the grammar.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from glmserve.nano.checkpoint import load_checkpoint
from glmserve.nano.corpus import Example, conversations, is_heldout, user_style_examples
from glmserve.nano.data import collate, encode
from glmserve.nano.objective import compute_losses
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.server import start_server

KINDS = ("tool_call", "tool_call_unseen", "tool_answer", "arithmetic_thinking", "arithmetic_direct", "tool_call_user")
# Each printed rate: the kind it is measured on and the check (from `score`) it counts.
RATES = {"tool_name_accuracy": ("tool_call", "name"),
         "tool_exact_args_accuracy": ("tool_call", "exact"),
         "unseen_schema_name_accuracy": ("tool_call_unseen", "name"),
         "unseen_schema_exact_accuracy": ("tool_call_unseen", "exact"),
         "user_tool_name_accuracy": ("tool_call_user", "name"),
         "user_tool_exact_accuracy": ("tool_call_user", "exact"),
         "user_tool_valid_calls": ("tool_call_user", "valid"),
         "user_tool_called": ("tool_call_user", "called"),
         "answer_uses_tool_result": ("tool_answer", "uses_result"),
         "thinking_arithmetic_accuracy": ("arithmetic_thinking", "correct"),
         "thinking_arithmetic_reasoned": ("arithmetic_thinking", "reasoned"),
         "nonthinking_direct_answer": ("arithmetic_direct", "direct"),
         "nonthinking_arithmetic_accuracy": ("arithmetic_direct", "correct")}


def kind_of(example: Example) -> str | None:
    """Which evaluation an example serves, if any: only turns whose user text, arithmetic problem or called
    tools are themselves held out (a held-out conversation may repeat a training text in another context)."""
    expected = example.expected
    unseen_tool = any(map(is_heldout, expected.get("called", ())))
    new_text = is_heldout(f"text:{example.user}")
    if "calls" in expected:
        return "tool_call_unseen" if unseen_tool else "tool_call" if new_text else None
    if "values" in expected:
        return "tool_answer" if unseen_tool or new_text else None
    if "answer" in expected and is_heldout(f"problem:{expected['problem']}"):
        if not example.thinking:
            return "arithmetic_direct"
        return "arithmetic_thinking" if expected["two_digit"] else None
    return None


def heldout_cases(seed: int, per_kind: int, kinds: tuple[str, ...] = KINDS) -> dict[str, list[Example]]:
    cases: dict[str, list[Example]] = {kind: [] for kind in kinds}
    if "tool_call_user" in cases:
        cases["tool_call_user"] = user_style_examples(seed, per_kind)
    for conversation in conversations(seed, "heldout"):
        for example in conversation:
            kind = kind_of(example)
            if kind in cases and len(cases[kind]) < per_kind:
                cases[kind].append(example)
        if all(len(found) >= per_kind for found in cases.values()):
            return cases
    raise AssertionError("the held-out stream is endless")


def _last_number(text: str | None) -> str | None:
    numbers = re.findall(r"-?\d+", text or "")
    return numbers[-1] if numbers else None


def _valid_call(tools: list[dict], call: dict) -> bool:
    """The call names a listed tool and its arguments fit that tool's (flat) schema: known keys, required ones
    present, each value of its property's type and enum."""
    types = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    schema = schemas.get(call["function"]["name"])
    args = json.loads(call["function"]["arguments"])
    if schema is None or not isinstance(args, dict) or not set(schema["required"]) <= set(args):
        return False
    for key, value in args.items():
        prop = schema["properties"].get(key)
        if prop is None or not isinstance(value, types[prop["type"]]) or "enum" in prop and value not in prop["enum"]:
            return False
        if isinstance(value, bool) and prop["type"] != "boolean":
            return False
    return True


def score(kind: str, example: Example, reasoning: str | None, content: str | None,
          calls: list[dict]) -> dict[str, bool]:
    """The checks one reply passes (each a rate's numerator); `calls` are OpenAI tool calls as dicts."""
    if kind.startswith("tool_call"):
        wanted = example.expected["calls"]
        names = [c["function"]["name"] for c in calls]
        right_names = names == [c["name"] for c in wanted]
        args = [json.loads(c["function"]["arguments"]) for c in calls]
        checks = {"name": right_names, "exact": right_names and args == [c["arguments"] for c in wanted]}
        if kind == "tool_call_user":  # valid among all replies; a reply with no call (all text) is not valid
            checks["called"] = bool(calls)
            checks["valid"] = bool(calls) and all(_valid_call(example.tools, c) for c in calls)
        return checks
    if kind == "tool_answer":
        used = not calls and all(value in (content or "") for value in example.expected["values"])
        return {"uses_result": used}
    correct = _last_number(content) == str(example.expected["answer"])
    if kind == "arithmetic_thinking":
        return {"correct": correct, "reasoned": reasoning is not None}
    return {"correct": correct, "direct": reasoning is None and content is not None}


def request_messages(messages: list[dict]) -> list[dict]:
    """The corpus's messages as an OpenAI client sends them: assistant tool calls with ids and JSON-string
    arguments, tool results answering them by `tool_call_id` (the server renders both back to the same prompt)."""
    sent, pending = [], []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": f"call_{len(sent)}_{j}", "type": "function",
                                "function": {"name": c["function"]["name"],
                                             "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                               for j, c in enumerate(m["tool_calls"])]
            pending = [c["id"] for c in m["tool_calls"]]
        elif m["role"] == "tool":
            m["tool_call_id"] = pending.pop(0)
        sent.append(m)
    return sent


def chat(client, model: str, example: Example, max_tokens: int) -> tuple[str | None, str | None, list[dict]]:
    """One held-out turn through the server: (reasoning_content, content, tool_calls)."""
    tools = {"tools": example.tools} if example.tools else {}
    response = client.chat.completions.create(
        model=model, messages=request_messages(example.messages), **tools, temperature=0.0, max_tokens=max_tokens,
        extra_body={"chat_template_kwargs": {"enable_thinking": example.thinking}})
    message = response.choices[0].message
    calls = [c.model_dump() for c in message.tool_calls or ()]
    # An empty reply comes back as "" (OpenAI's convention); for scoring it is no content, as the parser says.
    return (message.model_extra or {}).get("reasoning_content"), message.content or None, calls


def serve_and_chat(model_dir: str | Path, examples: list[Example], max_tokens: int, threads: int,
                   concurrency: int = 8, server_args: tuple[str, ...] = (),
                   quantization: str | None = None) -> list[tuple[str | None, str | None, list[dict]]]:
    """Start `glmserve serve` on the checkpoint (with server_args), send every example's turn, stop the server."""
    import openai

    extra = [] if quantization is None else ["--quantization", quantization]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server([str(model_dir), "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
                               *server_args, *extra],
                              Path(tmp) / "server.log", env={"OMP_NUM_THREADS": str(threads)}, timeout=600)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
            with ThreadPoolExecutor(concurrency) as pool:
                return list(pool.map(lambda e: chat(client, str(model_dir), e, max_tokens), examples))
        finally:
            server.stop()


def mtp_rates(model_dir: str | Path, seed: int, num_conversations: int, tokens_per_batch: int = 8192,
              quantization: str | None = None) -> dict:
    """Teacher-forced next-token and MTP rates over the completions of held-out conversations."""
    model, tokenizer = load_checkpoint(model_dir, quantization), Tokenizer(model_dir)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    stream = conversations(seed, "heldout")
    sequences = sorted((s for _ in range(num_conversations) for s in encode(tokenizer, next(stream))),
                       key=lambda s: len(s.ids))
    totals: dict[str, int] = defaultdict(int)
    start = 0
    with torch.inference_mode():
        while start < len(sequences):
            end = start + 1
            while end < len(sequences) and (end - start + 1) * len(sequences[end].ids) <= tokens_per_batch:
                end += 1
            losses = compute_losses(model, collate(sequences[start:end], pad_id))
            for key in ("main_correct", "mtp_correct", "main_count", "mtp_count", "mtp_agree"):
                totals[key] += getattr(losses, key)
            start = end
    return {"next_token_accuracy": totals["main_correct"] / totals["main_count"],
            "mtp_next_next_token_accuracy": totals["mtp_correct"] / totals["mtp_count"],
            "mtp_agreement_with_main": totals["mtp_agree"] / totals["mtp_count"]}


def evaluate(model_dir: str | Path, seed: int = 1000, per_kind: int = 100, max_tokens: int = 256,
             show: int = 0, mtp_conversations: int = 200, threads: int = 2, kinds: tuple[str, ...] = KINDS,
             server_args: tuple[str, ...] = (), quantization: str | None = None, concurrency: int = 8) -> dict:
    """The rates of `kinds` on `per_kind` held-out turns each (served with server_args and --quantization
    `quantization`), and the MTP rates (teacher-forced, with the same weights) unless `mtp_conversations` is 0."""
    cases = heldout_cases(seed, per_kind, kinds)
    flat = [(kind, example) for kind in kinds for example in cases[kind]]
    replies = serve_and_chat(model_dir, [example for _, example in flat], max_tokens, threads, concurrency,
                             server_args=server_args, quantization=quantization)
    passed: dict[str, dict[str, int]] = {kind: defaultdict(int) for kind in kinds}
    shown: dict[str, int] = defaultdict(int)
    for (kind, example), (reasoning, content, calls) in zip(flat, replies):
        for check, ok in score(kind, example, reasoning, content, calls).items():
            passed[kind][check] += ok
        if shown[kind] < show:
            shown[kind] += 1
            called = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            print(f"--- {kind}\nuser: {example.user!r}\nexpected: {example.completion!r}\n"
                  f"reasoning: {reasoning!r}\ncontent: {content!r}\ntool calls: {called!r}")
    rates = {name: passed[kind][check] / per_kind for name, (kind, check) in RATES.items() if kind in kinds}
    if mtp_conversations:
        rates.update(mtp_rates(model_dir, seed, mtp_conversations, quantization=quantization))
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--seed", type=int, default=1000, help="held-out stream seed")
    p.add_argument("--per-kind", type=int, default=100, help="prompts per evaluation kind")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--show", type=int, default=0, help="print this many replies per kind")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS,
                   help="measure only these kinds, e.g. one rate on many prompts (the MTP rates need all)")
    p.add_argument("--kv-cache-dtype", default="auto", help="the server's --kv-cache-dtype (the task rates only)")
    p.add_argument("--quantization", help="weights held in this format (glmserve serve --quantization)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--tool-strict-level", default="auto",
                   help="the server's --tool-strict-level (parameter: every tool call held to its schema)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = tuple(args.kinds)
    rates = evaluate(args.model, args.seed, args.per_kind, args.max_tokens, args.show,
                     mtp_conversations=200 if set(kinds) == set(KINDS) else 0, threads=args.threads, kinds=kinds,
                     server_args=("--kv-cache-dtype", args.kv_cache_dtype,
                                  "--tool-strict-level", args.tool_strict_level), quantization=args.quantization,
                     concurrency=args.concurrency)
    print(json.dumps({name: round(value, 4) for name, value in rates.items()}, indent=2))


if __name__ == "__main__":
    main()
