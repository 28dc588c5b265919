"""`--load-format dummy` (vLLM's name): random weights from config.json alone, for timing real shapes (a
GLM-4.5-Air slice on a GPU) without writing or reading a multi-gigabyte checkpoint.

Every parameter is drawn on its device from its own generator, seeded by its name, so replicated parameters
(norms, router, embeddings) are equal on every tensor-parallel rank; norms are ones and the router's correction
bias zero, as in a fresh model, and the rest uniform in ±0.02 (small enough that activations stay finite through
the layers).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

DUMMY_RANGE = 0.02


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            param.data.zero_()
        else:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator(param.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            values = torch.rand(param.shape, generator=generator, dtype=torch.float32, device=param.device)
            param.data.copy_(values.mul_(2 * DUMMY_RANGE).sub_(DUMMY_RANGE))
