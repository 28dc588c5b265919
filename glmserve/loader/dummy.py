"""`--load-format dummy` (vLLM's name): random weights from config.json alone, for timing real shapes (a
GLM-4.5-Air slice on a GPU) without writing or reading a multi-gigabyte checkpoint.

Every parameter is drawn on its device from its own generator, seeded by its name, so replicated parameters
(norms, router, embeddings) are equal on every tensor-parallel rank; norms are ones and the router's correction
bias zero, as in a fresh model, and the rest uniform in ±0.02 (small enough that activations stay finite through
the layers). Weights held by a QuantMethod are drawn a slice of rows at a time and stored through it, as a
checkpoint's would be, so a quantized model never exists in fp32 as a whole.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

DUMMY_RANGE = 0.02
SLICE_ELEMENTS = 1 << 22  # fp32 values drawn at a time for a quantized weight (16 MiB)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    values = torch.rand(shape, generator=generator, dtype=torch.float32, device=device)
    return values.mul_(2 * DUMMY_RANGE).sub_(DUMMY_RANGE)


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            param.data.zero_()
        elif hasattr(param, "load_rows"):
            _fill_in_slices(param, _generator(seed, name, param.device))
        else:
            param.data.copy_(_uniform(param.shape, _generator(seed, name, param.device), param.device))


def _fill_in_slices(param: nn.Parameter, generator: torch.Generator) -> None:
    *experts, rows, cols = param.logical_shape
    step = max(1, SLICE_ELEMENTS // cols)
    for expert in range(experts[0]) if experts else [None]:
        for row in range(0, rows, step):
            param.load_rows(expert, row, _uniform((min(step, rows - row), cols), generator, param.device))
