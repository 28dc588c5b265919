"""Widen a checkpoint without changing what it computes: `python -m glmserve.nano.widen --out DIR --hidden-size H
--attention-heads N --kv-heads K SRC`.

The 6-layer nano model plateaued with more training at its width; a wider one trained from scratch would need the
hours its lineage already had. Widening keeps them, as growing (grow.py) does for depth. Every new unit is split
into what writes it and what reads it: writers (new embedding columns, new rows of o_proj / down_proj / eh_proj,
new heads' o_proj columns, all of eh_proj's new part) start at zero, so the new residual channels and heads stay
zero and the logits equal the source's; readers (the new columns of every other projection that reads the residual
stream, new heads' q/k/v rows) start random, so the zeroed writers get gradients and training moves both. The
RMSNorms over the hidden size now average over more (still zero) channels, so their weights are scaled by
sqrt(old/new) and kept in float32, and rms_norm_eps by old/new, which makes the normalised values exactly the
source's (the head-size q/k norms see eps ~3e-6 lower: negligible).
The query heads per key/value head stay the same, so every old query head keeps its key/value head.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from glmserve.nano.checkpoint import WEIGHTS_FILE, write_derived_checkpoint

READER_STD = 0.02  # the initializer_range new readers are drawn with, as init_model draws every input projection
# A tensor's two axes (rows, columns) by the role of its name's ending: "h" the hidden size, "q"/"kv" query or
# key/value heads, "-" an axis that does not change. Rows of a writer or columns of a zeroed input start at zero.
AXES = {
    "embed_tokens.weight": ("-", "h"), "lm_head.weight": ("-", "h"), "shared_head.head.weight": ("-", "h"),
    "q_proj.weight": ("q", "h"), "k_proj.weight": ("kv", "h"), "v_proj.weight": ("kv", "h"),
    "q_proj.bias": ("q",), "k_proj.bias": ("kv",), "v_proj.bias": ("kv",),
    "o_proj.weight": ("h", "q"), "gate_proj.weight": ("-", "h"), "up_proj.weight": ("-", "h"),
    "down_proj.weight": ("h", "-"), "mlp.gate.weight": ("-", "h"),
}
WRITERS = ("embed_tokens.weight", "o_proj.weight", "down_proj.weight", "eh_proj.weight")
UNCHANGED = ("q_norm.weight", "k_norm.weight", "e_score_correction_bias")  # head-size norms, the router's bias


def _pad(tensor: torch.Tensor, sizes: tuple[int, ...], writer: bool, generator: torch.Generator) -> torch.Tensor:
    """`tensor` in the top-left corner of a `sizes` tensor; the rest zero for writers, random for readers (but zero
    for a new head's bias)."""
    if writer:
        fill = torch.zeros(sizes, dtype=torch.float32)
    else:
        fill = torch.randn(sizes, generator=generator) * READER_STD
        if tensor.dim() == 1:  # a new head's bias
            fill.zero_()
    fill[tuple(slice(0, n) for n in tensor.shape)] = tensor.float()
    return fill.to(tensor.dtype)


def widen_tensor(name: str, tensor: torch.Tensor, old: dict, new: dict, generator: torch.Generator) -> torch.Tensor:
    if name.endswith(UNCHANGED):
        return tensor
    if name.endswith("norm.weight"):  # every other norm normalises the hidden size
        scale = math.sqrt(old["h"] / new["h"])
        return torch.cat([tensor.float(), tensor.float().mean().expand(new["h"] - old["h"])]) * scale
    writer = name.endswith(WRITERS)
    if name.endswith("eh_proj.weight"):  # reads [enorm(embedding); hnorm(hidden)]: widen each half on its own
        halves = [_pad(half, (new["h"], new["h"]), writer, generator) for half in tensor.chunk(2, dim=1)]
        return torch.cat(halves, dim=1)
    ending = next((e for e in AXES if name.endswith(e)), None)
    if ending is None:
        raise ValueError(f"widening does not know the tensor {name}")
    return _pad(tensor, tuple(new[a] if a in new else n for a, n in zip(AXES[ending], tensor.shape)), writer,
                generator)


def widen(source: str | Path, out: str | Path, hidden_size: int, attention_heads: int, kv_heads: int,
          seed: int = 0) -> Path:
    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    head_dim = config["head_dim"]
    old = {"h": config["hidden_size"], "q": config["num_attention_heads"] * head_dim,
           "kv": config["num_key_value_heads"] * head_dim}
    new = {"h": hidden_size, "q": attention_heads * head_dim, "kv": kv_heads * head_dim}
    if any(new[a] < old[a] for a in old):
        raise ValueError("widening cannot shrink the hidden size or the number of heads")
    if attention_heads * config["num_key_value_heads"] != kv_heads * config["num_attention_heads"]:
        raise ValueError("keep the query heads per key/value head, so every old query head keeps its key/value head")
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(source / WEIGHTS_FILE)
    widened = {name: widen_tensor(name, t, old, new, generator) for name, t in tensors.items()}
    for name in widened:  # the MTP layer's embedding and head are the main ones (init_model ties them)
        if name.endswith(("embed_tokens.weight", "shared_head.head.weight")) and name.startswith("model.layers."):
            main = "model.embed_tokens.weight" if name.endswith("embed_tokens.weight") else "lm_head.weight"
            widened[name] = widened[main].clone()
    config.update(hidden_size=hidden_size, num_attention_heads=attention_heads, num_key_value_heads=kv_heads,
                  rms_norm_eps=config["rms_norm_eps"] * old["h"] / hidden_size)
    return write_derived_checkpoint(source, out, widened, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--hidden-size", type=int, required=True, help="new hidden size")
    parser.add_argument("--attention-heads", type=int, required=True, help="new number of query heads")
    parser.add_argument("--kv-heads", type=int, required=True, help="new number of key/value heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new readers' random weights")
    parser.add_argument("checkpoint", help="checkpoint directory to widen")
    args = parser.parse_args(argv)
    print(widen(args.checkpoint, args.out, args.hidden_size, args.attention_heads, args.kv_heads, args.seed))


if __name__ == "__main__":
    main()
