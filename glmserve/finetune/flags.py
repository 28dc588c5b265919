"""`glmserve finetune`'s flags, kept free of torch so that the CLI's parser builds fast (the training code is
imported when the command runs)."""

from __future__ import annotations

import argparse

from glmserve.models import EMBEDDED_MODEL

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The dense MLP (first_k_dense_replace layers) and the shared experts of MoE layers; not the routed experts.
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
CHECKPOINT_DIR = "checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags, with PEFT's and Hugging Face trainers' spellings as aliases (--lora-r, --lora-alpha,
    --lora-target-modules, --output-dir, --num-train-epochs, --learning-rate)."""
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="base checkpoint directory (default: the embedded glm-4.5-nano)")
    p.add_argument("--data", required=True, help="training JSONL, one OpenAI-format conversation a line")
    p.add_argument("--eval-data", help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out without --eval-data")
    p.add_argument("--output", "--output-dir", dest="output", required=True,
                   help="adapter directory to write (PEFT layout)")
    p.add_argument("--rank", "--lora-r", "-r", dest="rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", "--lora-alpha", dest="alpha", type=float, default=16.0,
                   help="lora_alpha: the update is scaled by alpha / r")
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    p.add_argument("--target-modules", "--lora-target-modules", dest="target_modules", nargs="+",
                   default=list(ATTENTION_TARGETS), choices=TARGETS, metavar="MODULE",
                   help=f"modules to adapt, of {', '.join(TARGETS)} (gate/up/down_proj: the dense MLP and the shared "
                        "experts; peft 0.21 with transformers 5 loads only the attention ones)")
    p.add_argument("--epochs", "--num-train-epochs", dest="epochs", type=float, default=1.0,
                   help="passes over the data (unless --max-steps)")
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-3,
                   help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--max-len", type=int, default=1024, help="longer sequences are dropped (and counted)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, held-out split and batch order")
    p.add_argument("--eval-steps", type=int, default=50, help="held-out loss every this many steps")
    p.add_argument("--save-steps", type=int, default=50, help="resumable checkpoint every this many steps")
    p.add_argument("--resume", nargs="?", const="", metavar="DIR",
                   help=f"continue from a checkpoint (default: OUTPUT/{CHECKPOINT_DIR})")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the checkpoint's)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glmserve.finetune",
                                description="LoRA fine-tuning of a checkpoint on the CPU; writes a PEFT adapter.")
    return add_arguments(p).parse_args(argv)
