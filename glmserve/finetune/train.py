"""`glmserve finetune` / `python -m glmserve.finetune`: LoRA supervised fine-tuning of a checkpoint on the CPU.

Reads a JSONL of OpenAI-format conversations (glmserve.finetune.data), trains a LoRA adapter on the assistant
turns with the checkpoint frozen (the project's model code; the embedded model's loss and batching), and writes a
PEFT adapter directory (adapter_config.json + adapter_model.safetensors) into --output. Every --save-steps, and at
the end, OUTPUT/checkpoint holds the adapter, the optimizer state and the step, so --resume continues the run
where it stopped, on the same batches it would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from glmserve.finetune.adapter import adapter_from_directory, write_adapter
from glmserve.finetune.data import DataError, load_conversations, sequences, split_heldout
from glmserve.finetune.flags import CHECKPOINT_DIR, parse_args
from glmserve.finetune.lora import LoraAdapter
from glmserve.nano.checkpoint import load_checkpoint
from glmserve.nano.data import Sequence, collate
from glmserve.nano.objective import next_token_loss
from glmserve.serving.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
LOG_FILE = "finetune_log.jsonl"


def batch_order(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of sequence indices: each epoch a fresh seeded shuffle, cut into batches of `batch_size`
    (the last one of an epoch may be smaller). Deterministic, so a resumed run skips to the same place."""
    epoch = 0
    while True:
        order = list(range(count))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        yield from (order[i: i + batch_size] for i in range(0, count, batch_size))
        epoch += 1


def learning_rate(args: argparse.Namespace, step: int, total: int) -> float:
    warmup = max(1, round(args.warmup_ratio * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def heldout_loss(model, data: list[Sequence], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per target token over the held-out sequences."""
    total = count = 0.0
    for i in range(0, len(data), batch_size):
        batch = collate(data[i: i + batch_size], pad_id)
        tokens = int(batch.target[:, 1:].sum())
        total += next_token_loss(model, batch)[1].item() * tokens
        count += tokens
    return total / max(count, 1)


def _data(args: argparse.Namespace, tokenizer: Tokenizer, template: str) -> tuple[list[Sequence], list[Sequence]]:
    conversations = load_conversations(args.data)
    if args.eval_data:
        train_convs, eval_convs = conversations, load_conversations(args.eval_data)
    else:
        train_convs, eval_convs = split_heldout(conversations, args.eval_fraction, args.seed)
    train, dropped = sequences(tokenizer, template, train_convs, args.max_len)
    heldout, dropped_eval = sequences(tokenizer, template, eval_convs, args.max_len)
    if dropped or dropped_eval:
        print(f"dropped {dropped} training and {dropped_eval} held-out sequences longer than --max-len "
              f"{args.max_len}", flush=True)
    if not train:
        raise DataError("no training sequence fits in --max-len")
    return train, heldout


def _save_state(adapter: LoraAdapter, optimizer: torch.optim.Optimizer, step: int, args, output: Path) -> None:
    directory = write_adapter(adapter, output / CHECKPOINT_DIR, args.model)
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, directory / STATE_FILE)


def _chat_template(args: argparse.Namespace, tokenizer: Tokenizer) -> str:
    if args.chat_template:
        return Path(args.chat_template).read_text(encoding="utf-8")
    from glmserve.serving.templates import glm45_chat_template

    return tokenizer.chat_template or glm45_chat_template()


def _adapter_and_optimizer(args: argparse.Namespace, model, output: Path
                           ) -> tuple[LoraAdapter, torch.optim.Optimizer, int]:
    """A fresh adapter at step 0, or with --resume the checkpoint's adapter, optimizer state and step."""
    if args.resume is None:
        adapter = LoraAdapter(model, args.target_modules, args.rank, args.alpha, args.use_rslora, args.seed)
        return adapter, torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay), 0
    resume = Path(args.resume or output / CHECKPOINT_DIR)
    adapter = adapter_from_directory(model, resume)
    if (adapter.rank, adapter.targets) != (args.rank, list(dict.fromkeys(args.target_modules))):
        raise ValueError(f"{resume} holds a rank-{adapter.rank} adapter of {adapter.targets}; resume it with "
                         f"the same --rank and --target-modules")
    if not (resume / STATE_FILE).is_file():
        raise ValueError(f"{resume} has no {STATE_FILE}: resume from the {CHECKPOINT_DIR} directory a run writes")
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state = torch.load(resume / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return adapter, optimizer, state["step"]


def finetune(args: argparse.Namespace) -> dict:
    """Train and write the adapter; returns the run's summary (steps, held-out loss before and after)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model {args.model} is not a checkpoint directory (no config.json)")
    tokenizer = Tokenizer(args.model)
    train, heldout = _data(args, tokenizer, _chat_template(args, tokenizer))
    pad_id = tokenizer.token_to_id("<|endoftext|>")

    model = load_checkpoint(args.model)  # fp32, every parameter frozen (the loader's default)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / args.batch_size)))
    adapter, optimizer, step = _adapter_and_optimizer(args, model, output)
    adapter.attach()

    output.mkdir(parents=True, exist_ok=True)

    def record(**fields) -> None:
        line = json.dumps(fields)
        tqdm.write(line)
        with open(output / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    summary = {"train_sequences": len(train), "heldout_sequences": len(heldout), "steps": total}
    if heldout:
        summary["heldout_loss_start"] = heldout_loss(model, heldout, pad_id, args.batch_size)
        record(step=step, heldout_loss=round(summary["heldout_loss_start"], 4))
    order = batch_order(len(train), args.batch_size, args.seed)
    for _ in range(step):  # the batches the resumed run already trained on
        next(order)
    start = time.monotonic()
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=args.no_progress)
    while step < total:
        lr = learning_rate(args, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = next_token_loss(model, collate([train[i] for i in next(order)], pad_id))[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if heldout and (step % args.eval_steps == 0 or step == total):
            summary["heldout_loss_end"] = heldout_loss(model, heldout, pad_id, args.batch_size)
            record(step=step, loss=round(loss.item(), 4), heldout_loss=round(summary["heldout_loss_end"], 4),
                   minutes=round((time.monotonic() - start) / 60, 2))
        if step % args.save_steps == 0 or step == total:
            _save_state(adapter, optimizer, step, args, output)
    bar.close()
    write_adapter(adapter, output, args.model)
    summary["minutes"] = (time.monotonic() - start) / 60
    print(f"wrote the adapter to {output} ({json.dumps(summary)})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        finetune(args)
    except ValueError as e:  # DataError included
        raise SystemExit(f"glmserve finetune: error: {e}") from e
    return 0
