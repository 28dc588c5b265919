"""Quantized products with many activation rows (prefill chunks, experts with many tokens): torch's GEMMs instead of
the native small-M kernel, which widens the weights in registers and does not block for cache.

- int8 with one scale per output channel: int32 sums of int8 activations quantized per row, from AMX tiles where the
  CPU has them (kernels/csrc/int8_gemm_amx.cpp) or torch._int_mm (oneDNN), scaled per row and channel
  (kernels.int8_channel_gemm): the native VNNI kernel's own arithmetic, run as a blocked GEMM. It reads the int8
  weight as it is stored (the tiles pack a slab of it per call), so it costs no memory.
- every other layout (int8 in groups, int4, fp8): the weight dequantized to bf16 a tile of output rows at a time and
  multiplied with oneDNN's bf16 GEMM. Activations and products are rounded to bf16 (relative error ~2^-9 each,
  below the weights' own quantization error); sums are fp32 inside the GEMM. One tile exists at a time, whatever
  the weight's size: TILE_ELEMENTS bf16 values (8 MiB) plus, while it is built, at most two int16 temporaries of the
  same size (24 MiB in all); nothing is kept between calls.

Only CPUs with the instructions these GEMMs are built on take this path (fast_layouts); the others keep every
product on the native kernels.

Measured by benchmarks/prefill_gemm.py; the thresholds below and the figures are in BENCHMARKS.md.

The two paths round differently, so a prompt's logits depend a little on how many rows its step holds.
GLMSERVE_PREFILL_GEMM=0 keeps every product on the native kernels (batch-invariant, slower prefill); tests that
hold the native path to exact properties (fp8 equal to its dequantized checkpoint, tp=2 equal to tp=1) set it.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from glmserve import kernels

# Fewest activation rows from which the GEMM path is used, per layout (kernels.reference's layouts). Below, the
# native kernel is as fast or faster: a tile's dequantization is paid once per call whatever the rows, int4 and fp8
# tiles take several int16 passes to build, and the native int8 kernel already runs VNNI. Crossovers measured at
# 2 threads with the native kernels on both threads (benchmarks/prefill_gemm.py, bench-57m / bench-528m / Air
# shapes; BENCHMARKS.md, session 16 merged): fp8 32-64 rows, int8 in groups 128-512, int4 1024-2048. Int8 per
# channel, re-measured in session 32 against today's quantizer and GEMM path: from 128 rows on every expert and
# attention shape (at 64 rows the shapes disagree).
GEMM_MIN_ROWS = {"int8-channel": 128, "int8-group": 256, "int4": 1024, "fp8": 64}
# With AMX int8 tiles (kernels.native.int8_tiles) the per-channel GEMM beats the native kernel from 32-64 rows on
# every bench and Air shape measured (and torch's _int_mm does too on that CPU).
GEMM_MIN_ROWS_WITH_TILES = {"int8-channel": 64}
TILE_ELEMENTS = 1 << 22  # an Air lm_head ([151552, 4096]) would be 1.2 GB as bf16: never widened whole
FP8_TO_BF16_SCALE = 2.0**120  # e4m3 bits placed in a bf16's exponent and mantissa read 2^120 times too small


def layout(weight: torch.Tensor, group_size: int, k: int) -> str | None:
    """The GEMM_MIN_ROWS key of a weight, None for the float dtypes (not handled here)."""
    if weight.dtype == torch.int8:
        return "int8-channel" if group_size >= k else "int8-group"
    return {torch.uint8: "int4", torch.float8_e4m3fn: "fp8"}.get(weight.dtype)


@functools.cache
def fast_layouts() -> frozenset[str]:
    """The layouts whose torch GEMM has this CPU's instructions: oneDNN's int8 GEMM (_int_mm) needs VNNI, its bf16
    GEMM avx512_bf16 or AMX. Without them both run fallback code that is slower than the native kernels at every
    row count (measured on an AVX2-only Zen 3: BENCHMARKS.md), so those layouts stay native."""
    fast = {"int8-channel"} if torch.cpu._is_vnni_supported() else set()
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        fast |= {"int8-group", "int4", "fp8"}
    return frozenset(fast)


def gemm_min_rows(kind: str) -> int:
    """Fewest activation rows from which a layout's products take the GEMM path on this CPU."""
    if kind in GEMM_MIN_ROWS_WITH_TILES and kernels.native.int8_tiles():
        return GEMM_MIN_ROWS_WITH_TILES[kind]
    return GEMM_MIN_ROWS[kind]


def native_max_rows(weight: torch.Tensor, group_size: int, k: int) -> float:
    """The most activation rows this weight's products keep on the native kernel (math.inf: every count)."""
    kind = layout(weight, group_size, k)
    if kind not in fast_layouts() or os.environ.get("GLMSERVE_PREFILL_GEMM") == "0":
        return math.inf
    return gemm_min_rows(kind) - 1


def wants_gemm(weight: torch.Tensor, group_size: int, rows: int, k: int) -> bool:
    """Whether `rows` activation rows are enough for the GEMM path to beat the native kernel on this weight."""
    return rows > native_max_rows(weight, group_size, k)


def _tile_values(weight: torch.Tensor) -> torch.Tensor:
    """A tile's stored values widened to bf16, unscaled (fp8: 2^-120 times the e4m3 value, see below)."""
    if weight.dtype == torch.int8:
        return weight.to(torch.bfloat16)  # exact: |q| <= 127
    if weight.dtype == torch.float8_e4m3fn:
        # An e4m3 byte seeeemmm, sign-extended to int16 and shifted left by 4, keeps its sign in bit 15 and its
        # exponent and mantissa in bits 10..4: a bf16 of the same sign, mantissa and exponent (bias 127 against 7),
        # subnormals included, so exactly value * 2^-120. torch's own fp8 -> bf16 cast is ~25x slower.
        return ((weight.view(torch.int8).to(torch.int16) << 4) & -0x7801).view(torch.bfloat16)
    # int4: each nibble n (q + 8) as the bf16 of 128 + n (bits 0x4300 | n), read back as q by subtracting 136.
    packed = weight.to(torch.int16)
    values = torch.empty(*weight.shape, 2, dtype=torch.int16)
    torch.bitwise_and(packed, 0x0F, out=values[..., 0])
    torch.bitwise_right_shift(packed, 4, out=values[..., 1])
    return values.view(weight.shape[0], -1).bitwise_or_(0x4300).view(torch.bfloat16).sub_(136)


def _tile_scales(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return scales * FP8_TO_BF16_SCALE if weight.dtype == torch.float8_e4m3fn else scales


def dequantize_tile(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [n, K] bf16 values of a tile of weight rows (the last group of a row may be shorter)."""
    values = _tile_values(weight)
    scales = _tile_scales(weight, scales).to(torch.bfloat16)
    n, k = values.shape
    whole = k // group_size * group_size
    if whole:
        values[:, :whole].view(n, -1, group_size).mul_(scales[:, : whole // group_size].unsqueeze(-1))
    if whole < k:
        values[:, whole:].mul_(scales[:, -1:])
    return values


def _tiled_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = weight.shape[0], x.shape[1]
    xb = x.to(torch.bfloat16)
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    # One scale per output row: applied to the output in fp32, no scaling pass (not fp8: its widened values are
    # 2^-120 too small to multiply without flushing, so its scales go in before the GEMM).
    per_row = group_size >= k and weight.dtype != torch.float8_e4m3fn
    step = max(1, TILE_ELEMENTS // k)
    for n0 in range(0, n, step):
        w, s = weight[n0 : n0 + step], scales[n0 : n0 + step]
        if per_row:
            torch.mul(F.linear(xb, _tile_values(w)), s.view(1, -1), out=out[:, n0 : n0 + step])
        else:
            out[:, n0 : n0 + step] = F.linear(xb, dequantize_tile(w, s, group_size))
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 @ W.T (+ bias) -> [..., N] fp32 for a scaled weight (int8, int4, fp8) of any layout."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    if layout(weight, group_size, k) == "int8-channel":
        out = kernels.int8_channel_gemm(rows, weight, scales, bias)
    else:
        out = _tiled_linear(rows, weight, scales, group_size)
        if bias is not None:
            out += bias
    return out.view(*x.shape[:-1], weight.shape[0])
