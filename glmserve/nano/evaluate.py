"""Measure a nano checkpoint on held-out conversations: `python -m glmserve.nano.evaluate --model DIR`.

Generates greedily with glmserve's offline `LLM` from held-out prompts (user texts, arithmetic problems and tool
names never in training), parses the outputs with the server's glm45 reasoning and tool-call parsers, and prints
issue 4's rates. The MTP rates are teacher-forced on held-out conversations: next-next-token accuracy, and how
often the MTP's greedy guess equals the main model's (what greedy speculative decoding would accept).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from glmserve.nano.checkpoint import load_checkpoint
from glmserve.nano.corpus import Example, conversations, is_heldout
from glmserve.nano.data import collate, encode
from glmserve.nano.objective import compute_losses
from glmserve.serving.parsers.glm45 import parse_output
from glmserve.serving.tokenizer import Tokenizer

KINDS = ("tool_call", "tool_call_unseen", "tool_answer", "arithmetic_thinking", "arithmetic_direct")


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


def heldout_cases(seed: int, per_kind: int) -> dict[str, list[Example]]:
    cases: dict[str, list[Example]] = {kind: [] for kind in KINDS}
    for conversation in conversations(seed, "heldout"):
        for example in conversation:
            kind = kind_of(example)
            if kind and len(cases[kind]) < per_kind:
                cases[kind].append(example)
        if all(len(found) >= per_kind for found in cases.values()):
            return cases
    raise AssertionError("the held-out stream is endless")


def _last_number(text: str | None) -> str | None:
    numbers = re.findall(r"-?\d+", text or "")
    return numbers[-1] if numbers else None


def score(kind: str, example: Example, output: str) -> dict[str, bool]:
    """The checks one output passes (each a rate's numerator)."""
    reasoning, content, calls = parse_output(output, example.tools, example.thinking)
    if kind.startswith("tool_call"):
        wanted = example.expected["calls"]
        names = [c["function"]["name"] for c in calls]
        right_names = names == [c["name"] for c in wanted]
        args = [json.loads(c["function"]["arguments"]) for c in calls]
        return {"name": right_names, "exact": right_names and args == [c["arguments"] for c in wanted]}
    if kind == "tool_answer":
        used = not calls and all(value in (content or "") for value in example.expected["values"])
        return {"uses_result": used}
    correct = _last_number(content) == str(example.expected["answer"])
    if kind == "arithmetic_thinking":
        return {"correct": correct, "reasoned": reasoning is not None}
    return {"correct": correct, "direct": reasoning is None and content is not None}


def generate(model_dir: str | Path, prompts: list[str], max_tokens: int) -> list[str]:
    from glmserve import LLM
    from glmserve.types import SamplingParams

    llm = LLM(model_dir)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].text for o in outputs]


def mtp_rates(model_dir: str | Path, seed: int, num_conversations: int, tokens_per_batch: int = 8192) -> dict:
    """Teacher-forced next-token and MTP rates over the completions of held-out conversations."""
    model, tokenizer = load_checkpoint(model_dir), Tokenizer(model_dir)
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
             show: int = 0, mtp_conversations: int = 200) -> dict:
    cases = heldout_cases(seed, per_kind)
    flat = [(kind, example) for kind in KINDS for example in cases[kind]]
    outputs = generate(model_dir, [example.prompt for _, example in flat], max_tokens)
    passed: dict[str, dict[str, int]] = {kind: defaultdict(int) for kind in KINDS}
    shown: dict[str, int] = defaultdict(int)
    for (kind, example), output in zip(flat, outputs):
        for check, ok in score(kind, example, output).items():
            passed[kind][check] += ok
        if shown[kind] < show:
            shown[kind] += 1
            print(f"--- {kind}\nprompt tail: {example.prompt[-120:]!r}\nexpected: {example.completion!r}\n"
                  f"output:   {output!r}")
    rates = {"tool_name_accuracy": passed["tool_call"]["name"] / per_kind,
             "tool_exact_args_accuracy": passed["tool_call"]["exact"] / per_kind,
             "unseen_schema_name_accuracy": passed["tool_call_unseen"]["name"] / per_kind,
             "unseen_schema_exact_accuracy": passed["tool_call_unseen"]["exact"] / per_kind,
             "answer_uses_tool_result": passed["tool_answer"]["uses_result"] / per_kind,
             "thinking_arithmetic_accuracy": passed["arithmetic_thinking"]["correct"] / per_kind,
             "thinking_arithmetic_reasoned": passed["arithmetic_thinking"]["reasoned"] / per_kind,
             "nonthinking_direct_answer": passed["arithmetic_direct"]["direct"] / per_kind,
             "nonthinking_arithmetic_accuracy": passed["arithmetic_direct"]["correct"] / per_kind}
    rates.update(mtp_rates(model_dir, seed, mtp_conversations))
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--seed", type=int, default=1000, help="held-out stream seed")
    p.add_argument("--per-kind", type=int, default=100, help="prompts per evaluation kind")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--show", type=int, default=0, help="print this many outputs per kind")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = evaluate(args.model, args.seed, args.per_kind, args.max_tokens, args.show)
    width = max(map(len, rates))
    for name, value in rates.items():
        print(f"{name:<{width}}  {100 * value:5.1f}%")


if __name__ == "__main__":
    main()
