"""Weight formats: one `QuantMethod` per format, chosen by name (`--quantization`, vLLM's flag; the names and
their group sizes are config.QUANTIZATION_METHODS)."""

from __future__ import annotations

from glmserve.config import QUANTIZATION_METHODS
from glmserve.layers.quantization.base import QuantizedTensor, QuantMethod
from glmserve.layers.quantization.scaled import (
    Fp8Method,
    Int4Method,
    Int8Method,
    ScaledMethod,
)
from glmserve.layers.quantization.unquantized import Fp16Method, UnquantizedMethod

METHODS = {"fp8": Fp8Method, "int8": Int8Method, "int4": Int4Method}


def get_quant_method(name: str | None, fp16_weights: bool = False, checkpoint_group_size: int | None = None,
                     float_vocab: bool = False) -> QuantMethod:
    """The method for --quantization NAME (None: float weights, fp16-stored when `fp16_weights`).
    checkpoint_group_size: an FP8 checkpoint's scale block / group width (None: per row), which fp8 keeps;
    float_vocab: embeddings and output heads stay float."""
    if name is None:
        return Fp16Method() if fp16_weights else UnquantizedMethod()
    method, group_size = QUANTIZATION_METHODS[name]
    return METHODS[method](checkpoint_group_size if method == "fp8" else group_size, float_vocab)


__all__ = [
    "Fp8Method",
    "Fp16Method",
    "Int4Method",
    "Int8Method",
    "QuantMethod",
    "QuantizedTensor",
    "ScaledMethod",
    "UnquantizedMethod",
    "get_quant_method",
]
