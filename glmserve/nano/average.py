"""Average checkpoints of one lineage (a "model soup"): `python -m glmserve.nano.average --out DIR A B [C ...]`.

Continuations trained from the same checkpoint with other seeds stay in one basin of the loss, and the mean of
their weights scores better: the shipped glm-4.5-nano is the mean of two continuations of one checkpoint, and its
4-layer predecessor the mean of a checkpoint and two continuations of it (docs/nano-training.md has the rates). Every
tensor is averaged in fp32 and stored in the first checkpoint's dtype; config, tokenizer and generation files are
the first checkpoint's, and every input must have the same tokenizer and the same tensor names and shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from glmserve.nano.checkpoint import WEIGHTS_FILE, write_derived_checkpoint


def average_checkpoints(sources: list[str | Path], out: str | Path) -> Path:
    sources, out = [Path(s) for s in sources], Path(out)
    if len(sources) < 2:
        raise ValueError("averaging needs at least two checkpoints")
    first = sources[0]
    tokenizer = (first / "tokenizer.json").read_bytes()
    states = []
    for source in sources:
        if (source / "tokenizer.json").read_bytes() != tokenizer:
            raise ValueError(f"{source} has another tokenizer than {first}: only one lineage can be averaged")
        states.append(load_file(source / WEIGHTS_FILE))
    reference = {name: (t.shape, t.dtype) for name, t in states[0].items()}
    for source, state in zip(sources[1:], states[1:]):
        if {name: (t.shape, t.dtype) for name, t in state.items()} != reference:
            raise ValueError(f"{source}'s tensors differ from {first}'s in names, shapes or dtypes")
    averaged = {name: (sum(state[name].float() for state in states) / len(states)).to(dtype)
                for name, (_, dtype) in reference.items()}
    return write_derived_checkpoint(first, out, averaged)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories of one lineage")
    args = parser.parse_args(argv)
    print(average_checkpoints(args.checkpoints, args.out))


if __name__ == "__main__":
    main()
