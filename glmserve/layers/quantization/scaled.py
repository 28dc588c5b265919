"""Weight-only quantized formats with fp32 scales per group of inputs (glmserve/kernels/reference.py's layouts):
int8, int4 (two to a byte) and fp8 e4m3. Activations stay fp32; the products run in glmserve.kernels, which
widens the weights in registers (native) or dequantizes them (the torch reference).

Weights are quantized as they stream in, a few rows at a time, so loading never holds more than the quantized
model plus one checkpoint tensor. Every linear layer is quantized, the lm_head included (as llama.cpp's q8_0 and
q4_0 files do), and so are the embedding tables (a lookup dequantizes only the rows it reads: int8 rows under
int8 and fp8, whose e4m3 would round them coarser for no saving; int4 under int4), which is what lets the whole
model fit in about one byte (int8, fp8) or half a byte (int4) per parameter. An FP8 checkpoint held as it is
stored (fp8's float_vocab) keeps the embeddings and heads its release left in bf16 as float.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve import kernels
from glmserve.layers.quantization import prefill_gemm
from glmserve.layers.quantization.base import (
    NativeWeight,
    QuantizedTensor,
    QuantMethod,
    Source,
    float_values,
    weight_rows,
)
from glmserve.layers.quantization.unquantized import UnquantizedMethod

QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # rows quantized at a time: 16 MiB of fp32, whatever the tensor's size
FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize_fp8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with one scale per group (absmax / 448), as FP8 checkpoints store theirs."""
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    scales = padded.abs().amax(-1) / FP8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (padded / safe.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).view(n, -1)[:, :k].to(torch.float8_e4m3fn)
    return q, scales


QUANTIZERS = {torch.int8: kernels.quantize_int8, torch.uint8: kernels.quantize_int4, torch.float8_e4m3fn: quantize_fp8}


class ScaledMethod(QuantMethod):
    """Storage: `<name>` in `storage_dtype` (uint8: int4, two inputs to a byte), [rows, cols / pack] per expert, and
    `<name>_scale` fp32 [rows, ceil(cols / group)]; the group size (`<param>.group_size`) is the method's, or the
    whole row (per output channel) when the method has none. A stacked expert pair shares one group size, as the
    MoE kernel takes one: per channel it is the larger of hidden and intermediate (one group per row either way)."""

    storage_dtype: torch.dtype
    embedding_dtype = torch.int8  # with one scale per row

    def __init__(self, group_size: int | None = None, float_vocab: bool = False):
        self.group_size = group_size
        self._vocab_method = UnquantizedMethod() if float_vocab else self

    @property
    def vocab_method(self) -> QuantMethod:
        """float_vocab: the embeddings and output heads stay float (an FP8 checkpoint's, stored in bf16)."""
        return self._vocab_method

    def keeps(self, source: QuantizedTensor, group_size: int) -> bool:
        """Whether a checkpoint's quantized weight, already in the storage dtype, is stored as it is."""
        return False

    def _create(self, layer: nn.Module, name: str, num_experts: int | None, rows: int, cols: int,
                group_size: int, dtype: torch.dtype) -> None:
        pack = 2 if dtype == torch.uint8 else 1
        if cols % pack:
            raise ValueError(f"{self.name}: {cols} inputs do not pack {pack} to a byte")
        lead = () if num_experts is None else (num_experts,)
        param = nn.Parameter(torch.empty(*lead, rows, cols // pack, dtype=dtype), requires_grad=False)
        param.group_size = group_size
        self._register(layer, name, param, (*lead, rows, cols))
        layer.register_buffer(f"{name}_scale", torch.empty(*lead, rows, -(-cols // group_size),
                                                           dtype=torch.float32))

    def create_linear(self, layer: nn.Module, rows: int, cols: int) -> None:
        self._create(layer, "weight", None, rows, cols, self.group_size or cols, self.storage_dtype)

    def create_experts(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int) -> None:
        group = self.group_size or max(hidden, intermediate)
        self._create(layer, "w13", num_experts, 2 * intermediate, hidden, group, self.storage_dtype)
        self._create(layer, "w2", num_experts, hidden, intermediate, group, self.storage_dtype)

    def create_embedding(self, layer: nn.Module, vocab: int, hidden: int) -> None:
        same_format = self.embedding_dtype == self.storage_dtype
        self._create(layer, "weight", None, vocab, hidden, self.group_size or hidden if same_format else hidden,
                     self.embedding_dtype)

    def load_rows(self, layer: nn.Module, name: str, expert: int | None, row: int, source: Source) -> None:
        weight = getattr(layer, name)
        count, group = source.shape[0], weight.group_size
        values, scales = (weight_rows(w, expert, row, count) for w in (weight, getattr(layer, f"{name}_scale")))
        if isinstance(source, QuantizedTensor) and source.values.dtype == weight.dtype and self.keeps(source, group):
            values.copy_(source.values)
            scales.copy_(source.scales)
            return
        quantize = QUANTIZERS[weight.dtype]
        source = float_values(source)
        step = max(1, QUANTIZE_CHUNK_ELEMENTS // source.shape[1])
        for start in range(0, count, step):
            q, s = quantize(source[start : start + step], group)
            values[start : start + step].copy_(q)
            scales[start : start + step].copy_(s)

    def apply_linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _linear(x, layer.weight, layer.weight_scale, layer.weight.group_size, bias)

    def apply_experts(self, layer: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """Prefill (as many rows per expert on average as the GEMM path wants): expert by expert, each through
        prefill_gemm or the native kernel by its own rows; with per-channel int8 weights that loop is one native
        call (kernels.moe_grouped_int8). Otherwise the native MoE block in one call."""
        group = layer.w13.group_size
        if prefill_gemm.wants_gemm(layer.w13, group, ids.numel() // layer.num_experts, layer.hidden):
            if (prefill_gemm.layout(layer.w13, group, layer.hidden) == "int8-channel"
                    and kernels.moe_grouped_int8_native(x, layer.w13)):
                return kernels.moe_grouped_int8(x, weights, ids, layer.expert_ids.start, layer.w13, layer.w13_scale,
                                                layer.w2, layer.w2_scale, group,
                                                prefill_gemm.native_max_rows(layer.w13, group, layer.hidden))
            return layer.grouped_forward(x, weights, ids, self.expert, allow_grouped_mm=False)
        return kernels.moe_experts(x, weights, layer.local_ids(ids), layer.w13, layer.w13_scale, layer.w2,
                                   layer.w2_scale, layer.w13.group_size)

    def native_linear(self, layer: nn.Module) -> NativeWeight:
        weight, group = layer.weight, layer.weight.group_size
        return NativeWeight(weight, layer.weight_scale, group,
                            prefill_gemm.native_max_rows(weight, group, layer.in_features))

    def native_experts(self, layer: nn.Module) -> tuple[NativeWeight, NativeWeight]:
        """Up to the rows per expert from which apply_experts takes the GEMM path: at T tokens an expert has at
        most T rows, so that many tokens always stay native."""
        group = layer.w13.group_size
        max_rows = prefill_gemm.native_max_rows(layer.w13, group, layer.hidden)
        return (NativeWeight(layer.w13, layer.w13_scale, group, max_rows),
                NativeWeight(layer.w2, layer.w2_scale, group, max_rows))

    def expert(self, layer: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's SwiGLU over its rows x (expert numbered on this rank)."""
        group = layer.w13.group_size
        gate_up = _linear(x, layer.w13[expert], layer.w13_scale[expert], group)
        return _linear(kernels.silu_and_mul(gate_up), layer.w2[expert], layer.w2_scale[expert], group)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embed_rows(layer.weight, layer.weight_scale, layer.weight.group_size, ids)


def _linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The native small-M kernel, or torch's GEMM (prefill_gemm) from as many rows as it needs to win."""
    k = x.shape[-1]
    if prefill_gemm.wants_gemm(weight, group_size, x.numel() // k, k):
        return prefill_gemm.linear(x, weight, scales, group_size, bias)
    return kernels.linear(x, weight, scales, group_size, bias)


class Int8Method(ScaledMethod):
    """Symmetric int8, q in [-127, 127]: per output channel by default, or groups (q8_0: 32)."""

    name = "int8"
    storage_dtype = torch.int8


class Int4Method(ScaledMethod):
    """Symmetric int4, q in [-8, 7] with scale absmax / 7 per group, two to a byte (q4_0-like, no zero point)."""

    name = "int4"
    storage_dtype = embedding_dtype = torch.uint8


class Fp8Method(ScaledMethod):
    """float8_e4m3fn: an FP8 checkpoint's weights and scales are kept as they are (group_size: its blocks' or
    groups' width; None: per row or per tensor); other weights are rounded to e4m3 with one scale per row (or
    group)."""

    name = "fp8"
    storage_dtype = torch.float8_e4m3fn

    def keeps(self, source: QuantizedTensor, group_size: int) -> bool:
        """Kept when its scales cover the same inputs as the layer's (one group per row on both sides, or equal
        groups); a shard that cut a group, or another layout, is requantized from its dequantized values."""
        cols = source.shape[1]
        return -(-cols // source.group_size) == -(-cols // group_size) == 1 or source.group_size == group_size
