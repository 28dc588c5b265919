"""FP8 checkpoints (GLM-4.5-FP8, GLM-4.5-Air-FP8): float8 weights with their scales, handed to the layers as they are.

config.json's `quantization_config` says which layout (GLM45.md §5.2):
- compressed-tensors, as zai-org's FP8 releases: `<linear>.weight` float8_e4m3fn [out, in] and
  `<linear>.weight_scale`, one scale per output row ([out, 1], strategy "channel"), per tensor, or per group of
  inputs; W = w * scale. Activations are quantized dynamically at run time there, so no scale is stored for them.
- DeepSeek-style block FP8 (`quant_method: fp8`, `weight_block_size: [rows, cols]`): `<linear>.weight_scale_inv`,
  one scale per block; W = w * scale_inv of its block.
Norms, embeddings, the router and the lm_head are stored unquantized and pass through unchanged. Each fp8 weight
reaches its layer as a QuantizedTensor in the kernels' layout (one scale per row per group of inputs); the layer's
QuantMethod keeps it in fp8 (the default on CPU) or dequantizes it to the compute dtype (CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from glmserve.layers.quantization import QuantizedTensor
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

    @property
    def group_size(self) -> int | None:
        """Inputs per scale (None: a whole row)."""
        return self.block[1] if self.block is not None else None

    def quantized(self, weight: torch.Tensor, scale: torch.Tensor) -> QuantizedTensor:
        """The weight with its scale in the kernels' layout: block scales repeated over their rows, a per-tensor
        scale over every row."""
        rows_out, cols_in = weight.shape
        s = scale.to(torch.float32)
        if self.block is not None and s.dim() == 2:
            rows, cols = self.block
            if s.shape != (-(-rows_out // rows), -(-cols_in // cols)):
                raise ValueError(f"an fp8 scale of shape {tuple(scale.shape)} does not fit the weight's "
                                 f"{tuple(weight.shape)} in blocks of {rows} x {cols}")
            return QuantizedTensor(weight, s.repeat_interleave(rows, 0)[:rows_out].contiguous(), cols)
        if s.numel() == rows_out and s.numel() > 1:
            return QuantizedTensor(weight, s.reshape(-1, 1), cols_in)
        if s.numel() == 1:
            return QuantizedTensor(weight, s.reshape(1, 1).expand(rows_out, 1), cols_in)
        raise ValueError(f"an fp8 scale of shape {tuple(scale.shape)} does not fit the weight's {tuple(weight.shape)}")


def with_scales(tensors: Iterable[tuple[str, torch.Tensor]], scheme: Fp8Scheme,
                read: Callable[[str], torch.Tensor | None]) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """The checkpoint's tensors with every fp8 weight joined to its scale (fetched with `read`, wherever it is
    stored) as a QuantizedTensor; the scales are consumed, as are static activation scales."""
    for name, tensor in tensors:
        if name.endswith(scheme.scale_suffix) or name.endswith(IGNORED_SUFFIXES):
            continue
        if tensor.dtype in FP8_DTYPES:
            scale = read(name + scheme.scale_suffix)
            if scale is None:
                raise LoaderError(f"fp8 tensor {name!r} has no {name + scheme.scale_suffix!r} in the checkpoint")
            try:
                tensor = scheme.quantized(tensor, scale)
            except ValueError as e:
                raise LoaderError(f"tensor {name!r}: {e}") from None
        yield name, tensor
