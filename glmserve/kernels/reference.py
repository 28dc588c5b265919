"""Plain torch references for the native kernels, and the weight layouts they share.

A weight is a row-major [N, K] tensor (N outputs, K inputs) whose dtype says its format:
- float32 / float16 / bfloat16: the values; `scales` is None.
- float8_e4m3fn: the values in one byte; `scales` fp32 [N, ceil(K / group_size)].
- int8: q in [-127, 127]; `scales` fp32 [N, ceil(K / group_size)]; W = q * scale of its group.
- uint8: int4 packed two to a byte, [N, K / 2] (K even): input 2j in the low nibble, 2j + 1 in the high one, each
  stored as q + 8 with q in [-8, 7]; `scales` as for int8 (symmetric, no zero point, as llama.cpp's q4_0).
The last group of a row may be shorter than group_size when K is not a multiple of it. Per-row scales are
group_size = K; a per-tensor scale is a [N, 1] column of one value; block scales ([rows, cols] blocks, as
DeepSeek-style FP8) are repeated over each block's rows to this form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNSCALED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |w| over each group of a row: [N, ceil(K / group_size)]."""
    n, k = w.shape
    padded = F.pad(w.float().abs(), (0, _num_groups(k, group_size) * group_size - k))
    return padded.view(n, -1, group_size).amax(-1)


def _expand(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return scales.float().repeat_interleave(group_size, 1)[:, :k]


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per group of `group_size` inputs (group_size = K: per output channel)."""
    scales = _group_absmax(w, group_size) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (w.float() / _expand(safe, w.shape[1], group_size)).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (q in [-8, 7], scale = absmax / 7 per group), packed two to a byte."""
    n, k = w.shape
    if k % 2:
        raise ValueError(f"int4 needs an even number of inputs, got {k}")
    scales = _group_absmax(w, group_size) / 7
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (w.float() / _expand(safe, k, group_size)).round().clamp(-8, 7).to(torch.int16) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scales


def dequantize(weight: torch.Tensor, scales: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The fp32 [N, K] values a weight in any of the layouts above stands for."""
    if weight.dtype in UNSCALED_DTYPES:
        return weight.float()
    if weight.dtype == torch.uint8:
        low = (weight & 0x0F).to(torch.int16) - 8
        high = (weight >> 4).to(torch.int16) - 8
        values = torch.stack((low, high), dim=-1).view(weight.shape[0], -1).float()
    elif weight.dtype in (torch.int8, torch.float8_e4m3fn):
        values = weight.float()
    else:
        raise TypeError(f"no kernel layout for weights of dtype {weight.dtype}")
    if scales is None:
        raise ValueError(f"{weight.dtype} weights need their scales")
    return values * _expand(scales, values.shape[1], group_size)


def embed_rows_reference(table: torch.Tensor, scales: torch.Tensor, group_size: int,
                         ids: torch.Tensor) -> torch.Tensor:
    """The rows ids (any shape) of a quantized [vocab, hidden] table, dequantized: [*ids.shape, hidden] fp32."""
    flat = ids.reshape(-1)
    rows = dequantize(table.index_select(0, flat), scales.index_select(0, flat), group_size)
    return rows.view(*ids.shape, -1)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                     group_size: int = 0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W.T (+ bias) -> [M, N] fp32."""
    return F.linear(x.float(), dequantize(weight, scales, group_size or x.shape[-1]), bias)


def int8_channel_gemm_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W.T (+ bias) for an int8 W with one scale per row, through torch's int8 GEMM (_int_mm) over x
    quantized to int8 per row. Every step is rounded as the native integer kernels round it (127 / absmax, ties to
    even, sum * (row scale * weight scale) + bias), so on a VNNI CPU this gives the VNNI kernel's bits."""
    # max |x| per row from two plain reductions: linalg.vector_norm(inf) took 2x the GEMM's time (profiled)
    top = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_())
    # 127 / top as one division (a Python number over a tensor is top.reciprocal() * 127: two roundings)
    inverse = torch.where(top > 0, torch.full_like(top, 127.0).div_(top), 0.0)
    xq = torch.mul(x, inverse).round_().to(torch.int8)
    out = torch._int_mm(xq, weight.t()).float().mul_((top / 127) * scales.view(1, -1))
    return out if bias is None else out.add_(bias)


def moe_experts_reference(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          w13: torch.Tensor, w13_scales: torch.Tensor | None, w2: torch.Tensor,
                          w2_scales: torch.Tensor | None, group_size: int = 0) -> torch.Tensor:
    """The routed experts of one MoE block: x [T, H]; topk_weights, topk_ids [T, k] (ids < 0: skipped, e.g. another
    rank's expert); w13 [E, 2I, H(/2)] gate then up, w2 [E, H, I(/2)], scales [E, rows, groups] or None.
    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    for expert in topk_ids.unique().tolist():
        if expert < 0:
            continue
        rows, slot = (topk_ids == expert).nonzero(as_tuple=True)
        s13 = None if w13_scales is None else w13_scales[expert]
        s2 = None if w2_scales is None else w2_scales[expert]
        gate, up = linear_reference(x[rows], w13[expert], s13, group_size).chunk(2, dim=-1)
        down = linear_reference(F.silu(gate) * up, w2[expert], s2, group_size)
        out.index_add_(0, rows, down * topk_weights[rows, slot].float().unsqueeze(1))
    return out


def rms_norm_residual_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual): a decoder layer's residual add and the next norm."""
    hidden = x.float() + residual.float()
    return F.rms_norm(hidden, weight.shape, weight.float(), eps), hidden


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum as int64 [B] (greedy sampling over the vocabulary); NaN counts as the maximum."""
    return logits.argmax(dim=-1)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight over the last dim, fp32."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps)


def qk_norm_rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                           k_weight: torch.Tensor | None, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           rotary_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) of the QKV projection's rows qkv [T, (Hq + 2 Hkv) D]: q and k heads
    RMS-normalized per head (in fp32, cast back) and scaled by q_weight / k_weight when given, then rotated NeoX-style
    (rotate_half) on their first rotary_dim dims. cos, sin: this step's rows [T, D] of layers/rotary.py's widened
    tables (cos 1 and sin 0 past rotary_dim, rotate_half's sign folded into sin), so a rotation is
    x * cos + partner(x) * sin with partner(x) swapping the two halves of the rotary dims. Any float dtype."""
    heads, half = num_q_heads + num_kv_heads, rotary_dim // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over the heads
    rows = qkv.view(qkv.shape[0], -1, head_dim)
    qk, v = rows[:, :heads], rows[:, heads : heads + num_kv_heads]
    if q_weight is not None:  # q and k heads normalized in one op, scaled in one more
        normed = F.rms_norm(qk.float(), (head_dim,), None, eps).to(qk.dtype)
        qk = normed * torch.cat([q_weight.expand(num_q_heads, -1), k_weight.expand(num_kv_heads, -1)])
    # One cat of views (4-7x faster than gathering with an index tensor for prefill-sized x).
    partner = torch.cat([qk[..., half:rotary_dim], qk[..., :half], qk[..., rotary_dim:]], -1)
    q, k = torch.addcmul(qk * cos, partner, sin).split([num_q_heads, num_kv_heads], dim=1)
    return q, k, v


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [T, 2I] rows (gate first): SwiGLU's activation."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def router_topk_reference(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.5's router (DeepSeek-V3 noaux_tc) from its fp32 logits [T, E]: sigmoid scores; the experts are chosen on
    scores + bias (the correction bias only chooses), within the topk_group groups whose two best choices sum
    highest; the chosen experts' unbiased scores weight them (divided by their sum when renormalize, times scale).
    Returns (weights [T, k] fp32, ids [T, k] int64)."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    if topk_group < n_group:
        grouped = choice.view(logits.shape[0], n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if scale != 1.0:  # (GLM-4.5: 2.5; Air and most small shapes: 1.0, a wasted op)
        weights = weights * scale
    return weights, ids
