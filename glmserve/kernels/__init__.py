"""Kernels: the native CPU extension's entry points, each with its plain torch reference beside it.

The public functions here take weights in the layouts `reference.py` defines (row-major [N, K], one fp32 scale per
group of K inputs) and run the native extension (`native.py`) when it is built for this CPU and the inputs fit it
(fp32 activations on CPU), else the reference. `isa` picks a code path for tests and benchmarks; by default the
fastest this CPU has, or GLMSERVE_KERNEL_ISA.
"""

from __future__ import annotations

import torch

from glmserve.kernels import native
from glmserve.kernels.reference import (
    argmax_reference,
    dequantize,
    linear_reference,
    moe_experts_reference,
    quantize_int4,
    quantize_int8,
    rms_norm_residual_reference,
)

NATIVE_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8)


def _fits_native(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and all(
        w.device.type == "cpu" and w.dtype in NATIVE_WEIGHT_DTYPES for w in weights)


def runs_native(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `linear` / `moe_experts` would run these on the native extension rather than the torch reference."""
    return native.extension() is not None and _fits_native(x, *weights)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, group_size: int = 0,
           bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """x [..., K] fp32 @ W.T (+ bias) -> [..., N] fp32, for W in any layout of reference.py."""
    ext = native.extension()
    if ext is None or not _fits_native(x, weight):
        return linear_reference(x, weight, scales, group_size, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = ext.linear(rows, weight.contiguous(), None if scales is None else scales.float().contiguous(), group_size,
                     None if bias is None else bias.float().contiguous(), native.isa_index(isa))
    return out.view(*x.shape[:-1], weight.shape[0])


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scales: torch.Tensor | None, w2: torch.Tensor, w2_scales: torch.Tensor | None,
                group_size: int = 0, isa: str | None = None) -> torch.Tensor:
    """The routed experts of one MoE block in one call, as `moe_experts_reference` defines them."""
    ext = native.extension()
    if ext is None or not _fits_native(x, w13, w2):
        return moe_experts_reference(x, topk_weights, topk_ids, w13, w13_scales, w2, w2_scales, group_size)

    def contiguous_scales(s: torch.Tensor | None) -> torch.Tensor | None:
        return None if s is None else s.float().contiguous()

    return ext.moe_experts(x.contiguous(), topk_weights, topk_ids, w13.contiguous(), contiguous_scales(w13_scales),
                           w2.contiguous(), contiguous_scales(w2_scales), group_size, native.isa_index(isa))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for [T, H] rows, in one pass on the native path."""
    ext = native.extension()
    if ext is None or not _fits_native(x, residual, weight) or x.dim() != 2 or residual.dtype != torch.float32:
        return rms_norm_residual_reference(x, residual, weight, eps)
    return ext.rms_norm_residual(x.contiguous(), residual.contiguous(), weight.float().contiguous(), eps)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: each row of fp32 [B, V] logits' first maximum (NaN counts as the maximum), as torch.argmax."""
    ext = native.extension()
    if ext is None or not _fits_native(logits) or logits.dim() != 2 or logits.shape[1] == 0:
        return argmax_reference(logits)
    return ext.argmax(logits.contiguous())


__all__ = ["runs_native", "argmax", "argmax_reference", "dequantize", "linear", "linear_reference", "moe_experts",
           "moe_experts_reference", "quantize_int4", "quantize_int8", "rms_norm_residual",
           "rms_norm_residual_reference"]
