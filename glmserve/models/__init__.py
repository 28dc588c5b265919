"""Checkpoints that ship inside the package.

`glm-4.5-nano` is the default model of `glmserve serve`, `glmserve chat` and `LLM()`: a 6.1M-parameter Glm4Moe
(MoE layers, QK-norm, partial RoPE, one MTP layer) trained by the project (`make nano` trains its 4-layer first
stage; docs/nano-training.md has the runs since) on the project's own GLM-4.5-format corpus (arithmetic with and without
thinking, tool calls, answers from tool results, short chat). A normal Hugging Face-layout directory;
nothing here is imported at run time but its path.
"""

from pathlib import Path

EMBEDDED_MODEL = Path(__file__).parent / "glm-4.5-nano"
