"""FP8 checkpoints (GLM-4.5-FP8, GLM-4.5-Air-FP8): float8 weights with their scales, dequantized while loading.

config.json's `quantization_config` says which layout (GLM45.md §5.2):
- compressed-tensors, as zai-org's FP8 releases: `<linear>.weight` float8_e4m3fn [out, in] and
  `<linear>.weight_scale`, one scale per output row ([out, 1], strategy "channel"), per tensor, or per group of
  inputs; W = w * scale. Activations are quantized dynamically at run time there, so no scale is stored for them.
- DeepSeek-style block FP8 (`quant_method: fp8`, `weight_block_size: [rows, cols]`): `<linear>.weight_scale_inv`,
  one scale per block; W = w * scale_inv of its block.
Norms, embeddings, the router and the lm_head are stored unquantized and pass through unchanged. The model then
computes in its own dtype (bf16 on GPU, fp32 on CPU): FP8 halves the download and the disk, not the memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from glmserve.loader.checkpoint import LoaderError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Static activation scales: nothing to do when activations stay in bf16/fp32.
IGNORED_SUFFIXES = (".input_scale",)


@dataclass(frozen=True)
class Fp8Scheme:
    scale_suffix: str  # appended to the weight's name: "_scale" or "_scale_inv"
    block: tuple[int, int] | None  # (rows, cols) of weight each scale covers; None: per row or per tensor

    @classmethod
    def from_config(cls, quantization: dict) -> "Fp8Scheme":
        """The scheme of a quantization_config (ModelConfig has checked its method and number format)."""
        if quantization["quant_method"] == "fp8":
            rows, cols = quantization.get("weight_block_size") or (0, 0)
            return cls("_scale_inv", (rows, cols) if rows else None)
        weights = next(iter(quantization["config_groups"].values()))["weights"]
        if weights.get("strategy") == "group":
            return cls("_scale", (1, int(weights["group_size"])))
        if weights.get("strategy") == "block":
            rows, cols = weights["block_structure"]
            return cls("_scale", (rows, cols))
        return cls("_scale", None)  # "channel" ([out, 1]) or "tensor" (one value)

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        w, s = weight.to(torch.float32), scale.to(torch.float32)
        if self.block is not None and s.dim() == 2:
            rows, cols = self.block
            s = s.repeat_interleave(rows, 0)[: w.shape[0]].repeat_interleave(cols, 1)[:, : w.shape[1]]
        elif s.numel() == w.shape[0] and s.numel() > 1:
            s = s.reshape(-1, 1)
        elif s.numel() != 1:
            raise ValueError(f"an fp8 scale of shape {tuple(scale.shape)} does not fit the weight's "
                             f"{tuple(weight.shape)}")
        return w * s


def dequantized(tensors: Iterable[tuple[str, torch.Tensor]], scheme: Fp8Scheme,
                read: Callable[[str], torch.Tensor | None]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every fp8 weight dequantized; its scale (fetched with `read`, wherever it
    is stored) is consumed, as are static activation scales."""
    for name, tensor in tensors:
        if name.endswith(scheme.scale_suffix) or name.endswith(IGNORED_SUFFIXES):
            continue
        if tensor.dtype in FP8_DTYPES:
            scale = read(name + scheme.scale_suffix)
            if scale is None:
                raise LoaderError(f"fp8 tensor {name!r} has no {name + scheme.scale_suffix!r} in the checkpoint")
            try:
                tensor = scheme.dequantize(tensor, scale)
            except ValueError as e:
                raise LoaderError(f"tensor {name!r}: {e}") from None
        yield name, tensor
