"""Check a written checkpoint: glmserve and transformers load it and compute the same logits, and glmserve
generates from it. `python -m glmserve.nano.verify DIR` (needs transformers, a test dependency)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import DenseBatch


def max_logit_difference(directory: str | Path, prompt: str = "[gMASK]<sop><|user|>\nWhat is 12 + 30?<|assistant|>"
                         ) -> float:
    """Largest |glmserve - transformers| over the prompt's logits, both in fp32 from the same files."""
    import transformers

    from glmserve.serving.tokenizer import Tokenizer

    transformers.logging.set_verbosity_error()  # it reports the MTP layer's tensors as unused, as for GLM-4.5
    ids = torch.tensor([Tokenizer(directory).encode(prompt)])
    runner = ModelRunner(ModelConfig.from_pretrained(directory), EngineConfig(model=str(directory), num_kv_blocks=8),
                         progress=False)
    reference = transformers.Glm4MoeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(ids[0], torch.arange(ids.shape[1]), DenseBatch(1)))
        theirs = reference(ids).logits[0]
    return (ours - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory")
    args = p.parse_args(argv)
    print(f"max |logits(glmserve) - logits(transformers)| = {max_logit_difference(args.directory):.2e}")

    from glmserve import LLM
    from glmserve.types import SamplingParams

    llm = LLM(args.directory)
    prompt = "[gMASK]<sop><|user|>\nWhat is 12 + 30?<|assistant|>"
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    print(f"glmserve greedy: {out.text!r} ({out.finish_reason})")


if __name__ == "__main__":
    main()
