"""Deepen a checkpoint without changing what it computes: `python -m glmserve.nano.grow --out DIR --extra-layers N SRC`.

The 4-layer nano model stopped improving with more training; more capacity trained from scratch would need the
hours its lineage already had. Growing keeps them: N MoE layers are appended after the last decoder layer, each a
copy of that layer with its output projections (o_proj and every down_proj) zeroed, so each new layer adds nothing
to the residual stream and the grown model's logits, MTP layer's included, equal the source's until training moves
them. The MTP layer keeps its weights and moves to the new last index, as the loader expects it after the decoder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from glmserve.nano.checkpoint import WEIGHTS_FILE, write_derived_checkpoint

ZEROED = ("self_attn.o_proj.weight", "down_proj.weight")  # what a layer adds to the residual stream
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def grow_depth(source: str | Path, out: str | Path, extra_layers: int) -> Path:
    source, out = Path(source), Path(out)
    if extra_layers < 1:
        raise ValueError("growing needs at least one extra layer")
    config = json.loads((source / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    if last < config.get("first_k_dense_replace", 0):
        raise ValueError("the last layer is dense: growing copies a MoE layer")
    grown: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(source / WEIGHTS_FILE).items():
        match = LAYER.fullmatch(name)
        index, rest = (int(match.group(1)), match.group(2)) if match else (None, "")
        if index is not None and index > last:  # an MTP layer: after the decoder, so after the new layers
            grown[f"model.layers.{index + extra_layers}.{rest}"] = tensor
            continue
        grown[name] = tensor
        if index == last:
            for i in range(1, extra_layers + 1):
                copy = torch.zeros_like(tensor) if rest.endswith(ZEROED) else tensor.clone()
                grown[f"model.layers.{last + i}.{rest}"] = copy
    config["num_hidden_layers"] += extra_layers
    return write_derived_checkpoint(source, out, grown, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--extra-layers", type=int, required=True, help="MoE layers to append")
    parser.add_argument("checkpoint", help="checkpoint directory to grow")
    args = parser.parse_args(argv)
    print(grow_depth(args.checkpoint, args.out, args.extra_layers))


if __name__ == "__main__":
    main()
