#!/usr/bin/env python
"""What quantizing activations to int8 (the avx512_vnni and avx2 paths: one scale per row against int8 and int4
weights, as fbgemm's dynamic int8 linear; llama.cpp's q8_0 dots use blocks of 32 instead) costs a whole model,
beside keeping them fp32: teacher-forced logits on the embedded model's held-out conversations, for int8 (per row)
and int4 (groups of 128) weights, each against the same model with fp32 weights.

Reported per (weights, activations): the largest and mean |logit error| against fp32 weights, the share of
positions whose greedy (argmax) token equals fp32 weights', and next-token accuracy; and between the two activation
paths of one weight format, their greedy-token agreement.

Example:
    python benchmarks/activation_quant_accuracy.py --output-json benchmarks/results/activation-quant-nano.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from glmserve.bench.host import write_results
from glmserve.kernels import native
from glmserve.layers.attention import DenseBatch
from glmserve.nano.checkpoint import load_checkpoint
from glmserve.nano.corpus import conversations
from glmserve.nano.data import collate, encode
from glmserve.serving.tokenizer import Tokenizer

MODEL = Path(__file__).resolve().parents[1] / "glmserve" / "models" / "glm-4.5-nano"


def held_out_batches(model_dir: Path, seed: int, count: int, tokens_per_batch: int) -> list:
    tokenizer = Tokenizer(model_dir)
    stream = conversations(seed, "heldout")
    sequences = sorted((s for _ in range(count) for s in encode(tokenizer, next(stream))), key=lambda s: len(s.ids))
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    out, start = [], 0
    while start < len(sequences):
        end = start + 1
        while end < len(sequences) and (end - start + 1) * len(sequences[end].ids) <= tokens_per_batch:
            end += 1
        out.append(collate(sequences[start:end], pad_id))
        start = end
    return out


def logits_and_labels(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at every position whose next token is a completion's, and those next tokens."""
    logits, labels = [], []
    with torch.inference_mode():
        for batch in batches:
            b, s = batch.ids.shape
            hidden = model(batch.ids.flatten(), torch.arange(s).repeat(b), DenseBatch(b)).view(b, s, -1)
            keep = batch.target[:, 1:]
            logits.append(model.compute_logits(hidden[:, :-1][keep]).float())
            labels.append(batch.ids[:, 1:][keep])
    return torch.cat(logits), torch.cat(labels)


def use_isa(isa: str) -> None:
    os.environ["GLMSERVE_KERNEL_ISA"] = isa
    native.default_isa.cache_clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--seed", type=int, default=1000, help="held-out stream seed")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)
    isas = native.available_isas()
    int8_activations = [isa for isa in isas if isa in native.INT8_ACTIVATION_ISAS]
    if not int8_activations:
        raise SystemExit(f"this CPU has no integer path ({', '.join(isas) or 'no native kernels'})")
    fp32_activations = native.fp32_activation_isa()
    batches = held_out_batches(args.model, args.seed, args.conversations, args.tokens_per_batch)
    use_isa(fp32_activations)
    reference, labels = logits_and_labels(load_checkpoint(args.model), batches)
    results = {"model": str(args.model), "conversations": args.conversations, "positions": labels.numel(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "fp32": {"next_token_accuracy": (reference.argmax(-1) == labels).float().mean().item()}}
    for quantization in ("int8", "int4"):
        model = load_checkpoint(args.model, quantization)
        greedy = {}
        for isa, name in ((fp32_activations, "fp32 activations"), (int8_activations[-1], "int8 activations (per row)")):
            use_isa(isa)
            logits, _ = logits_and_labels(model, batches)
            error = (logits - reference).abs()
            greedy[name] = logits.argmax(-1)
            results[f"{quantization} weights, {name}"] = {
                "isa": isa, "max_abs_logit_error": error.max().item(), "mean_abs_logit_error": error.mean().item(),
                "greedy_agreement_with_fp32": (greedy[name] == reference.argmax(-1)).float().mean().item(),
                "next_token_accuracy": (greedy[name] == labels).float().mean().item()}
        first, second = greedy.values()
        results[f"{quantization} weights, greedy agreement between the activation paths"] = (
            (first == second).float().mean().item())
    print(json.dumps(results, indent=1))
    if args.output_json:
        write_results(args.output_json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
