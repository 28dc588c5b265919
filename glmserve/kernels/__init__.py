"""Kernels: the native CPU extension's entry points, each with its plain torch reference beside it.

The public functions here take weights in the layouts `reference.py` defines (row-major [N, K], one fp32 scale per
group of K inputs) and dispatch to the native extension when it is built for this CPU, else to the reference.
"""

from glmserve.kernels.reference import (
    dequantize,
    linear_reference,
    moe_experts_reference,
    quantize_int4,
    quantize_int8,
)

linear = linear_reference
moe_experts = moe_experts_reference

__all__ = ["dequantize", "linear", "linear_reference", "moe_experts", "moe_experts_reference", "quantize_int4",
           "quantize_int8"]
