"""Train the embedded model: `python -m glmserve.nano.train --out DIR --minutes 55`.

Trains a BPE tokenizer on the corpus, then a small Glm4Moe (the project's own model code, fp32 on the CPU) with
AdamW, a time-based cosine learning rate, loss on completion tokens only, the MTP layer's next-next-token loss and
auxiliary-loss-free router balancing, and writes a Hugging Face-layout checkpoint into DIR. Time-bounded: the
schedule is a function of elapsed time, so the run ends, fully annealed, after --minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from glmserve.nano.checkpoint import (
    NANO_SHAPE,
    TINY_SHAPE,
    init_model,
    load_checkpoint,
    nano_config,
    save_checkpoint,
)
from glmserve.nano.corpus import chat_template, conversations
from glmserve.nano.data import batches, tokenizer_texts
from glmserve.nano.dialogues import SKILLS
from glmserve.nano.objective import LoadBalancer, Losses, compute_losses
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.tokenizer import save_test_tokenizer

SHAPES = {"nano": NANO_SHAPE, "tiny": TINY_SHAPE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=55.0,
                   help="training time; the tokenizer and the final save come on top")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule by steps)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="nano")
    p.add_argument("--init-from", help="continue training this checkpoint (its tokenizer, config and weights; a "
                                       "fresh optimizer and schedule); pass a new --seed for new conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the shape's)")
    p.add_argument("--tokenizer-conversations", type=int, default=3000, help="conversations BPE is trained on")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="padded tokens per optimizer step")
    p.add_argument("--max-len", type=int, default=1024, help="longer sequences are skipped")
    p.add_argument("--skill-weight", action="append", default=[], metavar="SKILL=WEIGHT", type=_skill_weight,
                   help=f"override one skill's share of the conversations (skills: {', '.join(SKILLS)}); "
                        "repeatable, e.g. to focus a continuation on what the evaluation finds weak")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--name-weight", type=float, default=1.0,
                   help="weight of the tokens of called tools' names in the loss (other completion tokens: 1)")
    p.add_argument("--balance-rate", type=float, default=1e-2, help="router bias change per step (0: off)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="checkpoint dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-seconds", type=float, default=30.0)
    p.add_argument("--save-minutes", type=float, default=10.0, help="also save every this many minutes")
    return p.parse_args(argv)


def _skill_weight(text: str) -> tuple[str, float]:
    name, sep, weight = text.partition("=")
    if not sep or name not in SKILLS:
        raise argparse.ArgumentTypeError(f"expected SKILL=WEIGHT with SKILL one of {', '.join(SKILLS)}")
    return name, float(weight)


class _Meter:
    """Averages over the steps since the last log line; prints one JSON line per log."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.since, self.steps, self.tokens = time.monotonic(), 0, 0
        self.main = self.mtp = 0.0
        self.hits = self.hits2 = self.count = self.count2 = 0

    def seconds(self) -> float:
        return time.monotonic() - self.since

    def add(self, losses: Losses, tokens: int) -> None:
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        self.main, self.mtp = self.main + losses.main.item(), self.mtp + losses.mtp.item()
        self.hits, self.hits2 = self.hits + losses.main_correct, self.hits2 + losses.mtp_correct
        self.count, self.count2 = self.count + losses.main_count, self.count2 + losses.mtp_count

    def log(self, step: int, start: float, lr: float, imbalance: float) -> None:
        record = {"step": step, "minutes": round((time.monotonic() - start) / 60, 2), "lr": round(lr, 6),
                  "loss": round(self.main / self.steps, 4), "mtp_loss": round(self.mtp / self.steps, 4),
                  "acc": round(self.hits / max(self.count, 1), 4),
                  "mtp_acc": round(self.hits2 / max(self.count2, 1), 4),
                  "tokens_per_s": round(self.tokens / self.seconds()), "expert_imbalance": round(imbalance, 2)}
        print(json.dumps(record), flush=True)
        self.reset()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices; not norms, biases or the (shared) embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_matrix = param.dim() >= 2 and "embed_tokens" not in name
            (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    warmup = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warmup * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def write_tokenizer(out: Path, args: argparse.Namespace, vocab_size: int) -> dict:
    corpus = tokenizer_texts(itertools.islice(conversations(args.seed, "train"), args.tokenizer_conversations))
    return save_test_tokenizer(out, vocab_size, chat_template=chat_template(), corpus=corpus, split_digits=True)


def _continue_from(source: Path, out: Path) -> tuple[dict, torch.nn.Module]:
    """The config and weights of a written checkpoint, as a trainable model (MTP embedding and head tied to the
    main ones again, as init_model ties them); its tokenizer files are copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(source / name, out / name)
    config = json.loads((source / "config.json").read_text())
    model = load_checkpoint(source)
    mtp = model.mtp_layer
    mtp.embed_tokens.weight = model.model.embed_tokens.weight
    mtp.shared_head.head.weight = model.lm_head.weight
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("e_score_correction_bias"))
    return config, model


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.init_from:
        config, model = _continue_from(Path(args.init_from), out)
    else:
        shape = SHAPES[args.shape]
        if args.vocab_size:
            shape = replace(shape, vocab_size=args.vocab_size)
        info = write_tokenizer(out, args, shape.vocab_size)
        config = nano_config(shape, info["eos_token_id"], info["pad_token_id"], args.dtype)
        model = init_model(config, args.seed)
    tokenizer = Tokenizer(out)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters, tokenizer: {tokenizer.vocab_size} tokens", flush=True)

    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  eps=1e-8)
    balancer = LoadBalancer(model, args.balance_rate)
    stream = conversations(args.seed + 1, "train", dict(args.skill_weight))
    data = batches(tokenizer, stream, args.tokens_per_batch, args.max_len, args.seed)
    budget = args.minutes * 60
    start = last_save = time.monotonic()
    meter = _Meter()
    step = 0
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.max_steps if args.max_steps else elapsed / budget
        if progress >= 1.0:
            break
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(data)
        losses = compute_losses(model, batch, args.name_weight)
        optimizer.zero_grad(set_to_none=True)
        losses.total(args.mtp_weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        imbalance = balancer.step()
        step += 1
        meter.add(losses, batch.ids.numel())
        if meter.seconds() >= args.log_seconds:
            meter.log(step, start, lr, imbalance)
        if time.monotonic() - last_save >= args.save_minutes * 60:
            save_checkpoint(model, config, out)
            last_save = time.monotonic()
    if meter.steps:
        meter.log(step, start, lr, imbalance)
    save_checkpoint(model, config, out)
    print(f"wrote {out} after {step} steps in {(time.monotonic() - start) / 60:.1f} minutes", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
