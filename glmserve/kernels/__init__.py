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
    embed_rows_reference,
    int8_channel_gemm_reference,
    linear_reference,
    moe_experts_reference,
    qk_norm_rope_reference,
    quantize_int4,
    quantize_int8,
    rms_norm_reference,
    rms_norm_residual_reference,
    router_topk_reference,
    silu_and_mul_reference,
)

NATIVE_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8)


def _fits_native(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.is_cpu and all(w.is_cpu and w.dtype in NATIVE_WEIGHT_DTYPES for w in weights)


def _fp32_rows(x: torch.Tensor, *others: torch.Tensor | None):
    """The extension, when it is built, x is [T, H] rows, every tensor given is fp32 on CPU and none needs a gradient
    (the native ops have no backward: training runs their references); else None. (Called for every small op of a
    step: the checks are the cheapest attribute reads.)"""
    ext = native.extension()
    if ext is None or x.dim() != 2:
        return None
    grad = torch.is_grad_enabled()
    for t in (x, *others):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or (grad and t.requires_grad)):
            return None
    return ext


def fused_ops_native(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the small fused ops (and a linear product beside them) run natively on these fp32 [T, H] rows and the
    other tensors of the call: the extension is built and no tensor needs a gradient."""
    return _fp32_rows(x, *others) is not None


def runs_native(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `linear` / `moe_experts` would run these on the native extension rather than the torch reference."""
    return native.extension() is not None and _fits_native(x, *weights)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, group_size: int = 0,
           bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """x [..., K] fp32 @ W.T (+ bias) -> [..., N] fp32, for W in any layout of reference.py."""
    ext = native.extension()
    if ext is None or not _fits_native(x, weight):
        return linear_reference(x, weight, scales, group_size, bias)
    return ext.linear(x, weight, scales, group_size, bias, native.isa_index(isa))


def tiles_beat_int_mm(rows: int, k: int) -> bool:
    """Whether int8_channel_gemm's AMX tiles beat torch's _int_mm on `rows` rows of `k` inputs: the tiles repack the
    whole weight on every call, which few rows of a long K do not repay (benchmarks/prefill_gemm.py, BENCHMARKS.md).
    The rule lives in the extension (ops.cpp), which moe_grouped_int8 applies per expert; only the native path asks."""
    return native.extension().tiles_beat_int_mm(rows, k)


def int8_channel_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                      isa: str | None = None, tiles: bool | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W.T (+ bias) for an int8 W [N, K] with one scale per row, as `int8_channel_gemm_reference`
    defines it, bit for bit: on the native path (the ISAs of native.INT8_ACTIVATION_ISAS; the others run the
    reference) the quantization of x and the scaling of the sums in one pass each, the sums from torch's int8 GEMM
    or, with `tiles` (default: where native.int8_tiles(isa) and tiles_beat_int_mm), from AMX tiles."""
    ext = native.extension()
    isa = isa or native.default_isa()
    if ext is None or isa not in native.INT8_ACTIVATION_ISAS or not _fits_native(x, weight):
        return int8_channel_gemm_reference(x, weight, scales, bias)
    if tiles is None:
        tiles = native.int8_tiles(isa) and tiles_beat_int_mm(x.shape[0], x.shape[1])
    return ext.int8_channel_gemm(x.contiguous(), weight.contiguous(), scales, bias, native.isa_index(isa), tiles,
                                 None)


def moe_grouped_int8_native(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """Whether `moe_grouped_int8` runs here: the extension is built, its default ISA quantizes activations (as
    int8_channel_gemm's native path needs) and x is fp32 on CPU with nothing needing a gradient."""
    return (w13.dtype == torch.int8 and native.default_isa() in native.INT8_ACTIVATION_ISAS
            and _fp32_rows(x) is not None)


def moe_grouped_int8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, first_expert: int,
                     w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                     group_size: int, native_max_rows: int) -> torch.Tensor:
    """A prefill chunk's routed experts with per-channel int8 weights, in one native call (where
    moe_grouped_int8_native): FusedExperts._add_expert_by_expert with ScaledMethod.expert, bit for bit, for the
    router's weights and ids [T, k] and a rank holding experts first_expert onwards. An expert with more than
    native_max_rows rows goes through int8_channel_gemm (AMX tiles as it would choose them), the others through
    the native kernel."""
    isa = native.default_isa()
    return native.extension().moe_grouped_int8(
        x.contiguous(), topk_weights.float().contiguous(), topk_ids.long().contiguous(), first_expert, w13, w13_scale,
        w2, w2_scale, group_size, native_max_rows, native.isa_index(isa), native.int8_tiles(isa))


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


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A router's logits [T, E] from fp32 rows [T, H] (where fused_ops_native): the native kernel for a decode's
    rows, torch's GEMM for a prefill's (the rule is the extension's, which the native stack's router follows too)."""
    return native.extension().router_logits(x.contiguous(), weight.contiguous(), native.isa_index(None))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight for fp32 rows."""
    ext = _fp32_rows(x, weight)
    if ext is None:
        return rms_norm_reference(x, weight, eps)
    return ext.rms_norm(x.contiguous(), weight.contiguous(), eps)


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for fp32 [T, H] rows, in one pass on the native path."""
    ext = _fp32_rows(x, residual, weight)
    if ext is None or x.shape != residual.shape:
        return rms_norm_residual_reference(x, residual, weight, eps)
    return ext.rms_norm_residual(x.contiguous(), residual.contiguous(), weight.contiguous(), eps)


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 rotary_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) as `qk_norm_rope_reference` defines them. The native path normalizes and rotates qkv's q and k
    columns in place (one call per layer) and returns views of qkv."""
    ext = _fp32_rows(qkv, cos, sin, q_weight, k_weight)
    if ext is None or not qkv.is_contiguous():
        return qk_norm_rope_reference(qkv, cos, sin, q_weight, k_weight, num_q_heads, num_kv_heads, head_dim,
                                      rotary_dim, eps)
    ext.qk_norm_rope_(qkv, cos, sin, q_weight, k_weight, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps)
    return qkv.view(qkv.shape[0], -1, head_dim).split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of fp32 [T, 2I] rows, gate first."""
    ext = _fp32_rows(x)
    if ext is None:
        return silu_and_mul_reference(x)
    return ext.silu_and_mul(x.contiguous())


def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, ids [T, k] int64) of GLM-4.5's router, as `router_topk_reference` defines them."""
    ext = _fp32_rows(logits, bias)
    if ext is None:
        return router_topk_reference(logits, bias, top_k, n_group, topk_group, renormalize, scale)
    return ext.router_topk(logits.contiguous(), bias.contiguous(), top_k, n_group, topk_group, renormalize, scale)


def embed_rows(table: torch.Tensor, scales: torch.Tensor, group_size: int, ids: torch.Tensor) -> torch.Tensor:
    """[*ids.shape, hidden] fp32: rows ids of a quantized embedding table, as `embed_rows_reference` defines them
    (one native call for int8 / int4 tables on CPU, where torch takes about a dozen small ops)."""
    ext = native.extension()
    if ext is None or table.dtype not in (torch.int8, torch.uint8) or not table.is_cpu or not ids.is_cpu:
        return embed_rows_reference(table, scales, group_size, ids)
    return ext.embed_rows(table, scales.float().contiguous(), group_size, ids.long().contiguous())


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: each row of fp32 [B, V] logits' first maximum (NaN counts as the maximum), as torch.argmax."""
    ext = _fp32_rows(logits)
    if ext is None or logits.shape[1] == 0:
        return argmax_reference(logits)
    return ext.argmax(logits.contiguous())


__all__ = ["argmax", "argmax_reference", "dequantize", "embed_rows", "embed_rows_reference", "fused_ops_native",
           "int8_channel_gemm", "int8_channel_gemm_reference", "linear", "linear_reference", "moe_experts",
           "moe_experts_reference", "qk_norm_rope", "qk_norm_rope_reference", "quantize_int4", "quantize_int8",
           "rms_norm", "rms_norm_reference", "rms_norm_residual", "rms_norm_residual_reference", "router_topk",
           "router_topk_reference", "runs_native", "silu_and_mul", "silu_and_mul_reference"]
