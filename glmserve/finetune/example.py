"""The worked example: teach the embedded model a fixed answer style it never writes.

Asked "What is 47 + 38?", glm-4.5-nano reasons and answers in one of its styles ("47 + 38 = 85.", "The answer is
85.", "It is 85."); the adapter makes it always answer "The result of 47 + 38 is 85.", keeping the reasoning. The
data are the embedded model's own arithmetic conversations (glmserve.nano.dialogues) with the answer rewritten,
split by problem as its corpus splits them, so no held-out problem is ever trained on. The held-out rate: the
share of held-out two-digit problems (thinking on) whose greedy reply's content is exactly that sentence with the
right numbers, generated greedily by glmserve's engine with LoRA on, the base model's and the adapter's requests
side by side in the same batches (`side_by_side`).

A style made of tokens the model never writes (JSON such as `{"answer": 85}`: `{"`, `":` and `}` never occur in
its completions) is out of reach of an attention-only adapter in minutes: those tokens' output-head rows were
never trained, and the loss on them stayed at ~6.6 after 100 steps while every other token was learnt.

`python -m glmserve.finetune.example --out DIR` writes the data, measures the base model, fine-tunes, measures the
adapter and prints both rates (README: "Fine-tuning a LoRA adapter").
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from glmserve.finetune.data import load_conversations, render_turns
from glmserve.nano.arithmetic import Problem
from glmserve.nano.corpus import is_heldout
from glmserve.nano.dialogues import arithmetic_dialogue
from glmserve.serving.templates import glm45_chat_template


def styled(problem_key: str, answer: int) -> str:
    """The answer in the taught style; `problem_key` as the corpus writes it ("47+38", "12*3")."""
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", problem_key).groups()
    return f"The result of {Problem(int(a), op, int(b)).expression()} is {answer}."


def conversation(rng: random.Random, thinking: bool) -> tuple[dict, dict, bool]:
    """(JSONL record, expected answer, held out?) for one arithmetic question, its answer in the JSON style."""
    dialogue = arithmetic_dialogue(rng, thinking)
    expected = dialogue.expected[0]
    messages = [dict(m) for m in dialogue.messages]
    messages[-1]["content"] = styled(expected["problem"], expected["answer"])
    record = {"messages": messages}
    if not thinking:
        record["chat_template_kwargs"] = {"enable_thinking": False}
    return record, expected, any(map(is_heldout, dialogue.keys))


def write_data(out: str | Path, train_count: int, heldout_count: int, seed: int = 0, thinking_share: float = 0.5
               ) -> tuple[Path, Path]:
    """train.jsonl (both thinking modes) and heldout.jsonl (two-digit sums and differences, thinking on: the
    problems the base model gets right 98% of the time, so the rate measures the style), deterministic in seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"finetune-example-{seed}")
    train, heldout = [], []
    while len(train) < train_count or len(heldout) < heldout_count:
        thinking = rng.random() < thinking_share
        record, expected, held = conversation(rng, thinking)
        if not held and len(train) < train_count:
            train.append(record)
        elif held and thinking and expected["two_digit"] and len(heldout) < heldout_count:
            heldout.append(record)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, records in zip(paths, (train, heldout)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return paths


def reply_content(text: str) -> str:
    """The content of a generated GLM-4.5 turn: what follows the reasoning."""
    return text.split("</think>")[-1].strip()


def side_by_side(model_dir: str | Path, heldout: str | Path, adapter_dir: str | Path, max_tokens: int = 160
                 ) -> tuple[float, float, list[str]]:
    """(base model's held-out rate, the adapter's, the adapter's reply contents): both served by one engine with
    LoRA on, every held-out question asked of the base model and of the adapter in the same batches, as
    `glmserve serve --enable-lora --lora-modules style=ADAPTER` serves them."""
    from glmserve import LLM
    from glmserve.types import LoRARequest, SamplingParams

    template = glm45_chat_template()
    prompts, answers = [], []
    for conv in load_conversations(heldout):
        prompts.append(render_turns(template, conv)[-1].prompt)
        answers.append(conv.messages[-1]["content"])
    style = LoRARequest("style", 1, str(adapter_dir))
    outputs = LLM(model_dir, enable_lora=True, max_lora_rank=64).generate(
        prompts * 2, SamplingParams(temperature=0.0, max_tokens=max_tokens),
        lora_request=[None] * len(prompts) + [style] * len(prompts))
    contents = [reply_content(o.outputs[0].text) for o in outputs]
    base, adapted = contents[:len(prompts)], contents[len(prompts):]
    rates = [sum(c == a for c, a in zip(replies, answers)) / len(prompts) for replies in (base, adapted)]
    return rates[0], rates[1], adapted


def main(argv: list[str] | None = None) -> None:
    from glmserve.finetune.train import finetune, parse_args
    from glmserve.models import EMBEDDED_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the data and the adapter")
    p.add_argument("--train", type=int, default=2000, help="training conversations")
    p.add_argument("--heldout", type=int, default=200, help="held-out questions the rate is measured on")
    p.add_argument("--seed", type=int, default=0)
    args, finetune_flags = p.parse_known_args(argv)  # the rest go to glmserve finetune (--max-steps, --lr, ...)
    out = Path(args.out)
    train, heldout = write_data(out, args.train, args.heldout, args.seed)
    summary = finetune(parse_args(["--data", str(train), "--eval-data", str(heldout), "--output",
                                   str(out / "adapter"), "--seed", str(args.seed), *finetune_flags]))
    before, after, contents = side_by_side(EMBEDDED_MODEL, heldout, out / "adapter")
    print(json.dumps({"heldout_rate_before": before, "heldout_rate_after": after, **summary,
                      "sample_replies": contents[:3]}, indent=2))


if __name__ == "__main__":
    main()
