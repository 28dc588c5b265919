"""Random weights in every layout of kernels/reference.py, shared by the kernel tests."""

import torch

from glmserve.kernels import quantize_int4, quantize_int8

FORMATS = ["float32", "float16", "bfloat16", "fp8", "int8", "int4"]
GROUPS = [32, 48, 64, 96, 128, 0]  # 0: one scale per output row


def make_weight(fmt: str, n: int, k: int, group_size: int, gen: torch.Generator):
    """A random [n, k] weight in `fmt`'s layout (kernels/reference.py) and its scales."""
    w = torch.randn(n, k, generator=gen)
    group = group_size or k
    if fmt == "int8":
        return quantize_int8(w, group)
    if fmt == "int4":
        return quantize_int4(w, group)
    if fmt == "fp8":
        scales = torch.rand(n, -(-k // group), generator=gen) + 0.5
        return (w / scales.repeat_interleave(group, 1)[:, :k]).to(torch.float8_e4m3fn), scales
    return w.to(getattr(torch, fmt)), None
