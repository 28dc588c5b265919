"""Float weights: unquantized (the compute dtype; on CPU in fp32 decode rows run on the native kernels or
oneDNN-prepacked weights, whichever benchmarks/kernel_speed.py measured faster) and fp16 storage for fp32 compute on CPU
(`--weight-dtype float16`: fbgemm's fp16 GEMM for linear layers, the native MoE kernel for the routed experts)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from glmserve import kernels
from glmserve.kernels import native
from glmserve.layers.quantization.base import (
    NativeWeight,
    QuantMethod,
    Source,
    float_values,
    stacked_shape,
    weight_rows,
)

# fp32 weights this large get a oneDNN-blocked copy: 1.2-5.8x faster than F.linear at 1-64 rows on every bench
# shape, the smallest [1024, 192] (benchmarks/results/kernels-fp32-openmp.json); fp16 storage uses the same bound.
PREPACK_MIN_ELEMENTS = 1 << 17
# oneDNN keeps memory for every distinct row count it has seen (measured: +2.2 GiB after 2,000 distinct counts on
# one [4096, 512] weight, and it outlives ONEDNN_PRIMITIVE_CACHE_CAPACITY), so a server whose prefill chunks vary
# would grow without bound. Up to 128 rows (decode steps) the packed path is 1.1-2.5x faster and its memory
# plateaus (+40 MiB); above, F.linear is within 15% and keeps nothing.
PACKED_MAX_ROWS = 128
# Up to this many rows the native kernel reads fp32 weights faster than oneDNN's packed GEMM, by the ISA it runs:
# with AVX-512 at 1 row on 11 of the 12 bench shapes (0.92-1.5x), at 2 on all (1.02-1.5x), and from 4 rows oneDNN's
# blocked layout wins; on an AVX2-only CPU, where oneDNN's kernels are half as wide, the native kernel won at every
# row count measured, 2 to 16, on five bench shapes (BENCHMARKS.md, session 24).
NATIVE_LINEAR_MAX_ROWS = {"avx2": 16}
NATIVE_LINEAR_DEFAULT_MAX_ROWS = 2
# The native MoE kernel against FusedExperts.grouped_forward (torch's grouped GEMM or per-expert products), fp32
# bench shapes: 2.6-3.3x faster at 1-16 tokens, 1.7-1.9x at 64-256, 1.4-1.8x at 512; level (bench-528m) to 1.5x
# (bench-57m) at 1024, 0.9-1.2x at 2048: larger prefills keep torch's grouped GEMM.
NATIVE_EXPERT_MAX_TOKENS = 512
# With fp16 storage and no native extension, experts this large (w13 elements) are stored in fbgemm's fp16 form:
# streaming a layer's experts from memory, a loop of fbgemm fp16 GEMMs measured 2.7x faster than torch's grouped
# GEMM over the fp32 stack (bench-57m shapes, 16 experts x 4 rows, 3 layers: 15.7 -> 5.8 ms). Smaller experts are
# bound by dispatch, where the grouped GEMM wins from a few tokens on.
EXPERT_FP16_MIN_ELEMENTS = 1 << 17


@functools.cache
def native_linear_max_rows() -> int:
    """Up to how many rows fp32 products run on the native kernel, on the ISA it runs here."""
    return NATIVE_LINEAR_MAX_ROWS.get(native.default_isa(), NATIVE_LINEAR_DEFAULT_MAX_ROWS)


def _native_rows(x: torch.Tensor, max_rows: int, *weights: torch.Tensor) -> bool:
    """Whether x's rows run on the native kernels: few enough rows, no autograd (training and LoRA fine-tuning
    take torch's differentiable ops), and the extension built for fp32 activations on CPU."""
    return (x.numel() <= max_rows * x.shape[-1] and not torch.is_grad_enabled()
            and kernels.runs_native(x, *weights))


def _onednn_prepack_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class UnquantizedMethod(QuantMethod):
    """Weights in the compute dtype, as the checkpoint (or an FP8 checkpoint dequantized) gives them."""

    def create_linear(self, layer: nn.Module, rows: int, cols: int) -> None:
        self._create(layer, "weight", None, rows, cols)
        layer.packed_weight = None  # oneDNN-blocked fp32 copy (process_linear)

    def create_experts(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int) -> None:
        self._create(layer, "w13", num_experts, 2 * intermediate, hidden)
        self._create(layer, "w2", num_experts, hidden, intermediate)

    def create_embedding(self, layer: nn.Module, vocab: int, hidden: int) -> None:
        self._create(layer, "weight", None, vocab, hidden)

    def _create(self, layer: nn.Module, name: str, num_experts: int | None, rows: int, cols: int) -> None:
        shape = stacked_shape(num_experts, rows, cols)
        self._register(layer, name, nn.Parameter(torch.empty(shape), requires_grad=False), shape)

    def load_rows(self, layer: nn.Module, name: str, expert: int | None, row: int, source: Source) -> None:
        weight_rows(getattr(layer, name), expert, row, source.shape[0]).copy_(float_values(source))

    def process_linear(self, layer: nn.Module) -> None:
        """On CPU in fp32, a weight also gets a oneDNN-blocked copy (what inductor's CPU weight freezing does),
        faster than F.linear's MKL path for the decode shapes. A oneDNN call costs ~35 us more than F.linear,
        though, which outweighs its gain on weights much smaller than the models' (measured on [128-512, 128-512]
        in an earlier torch), so those stay as they are."""
        weight = layer.weight
        if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= PREPACK_MIN_ELEMENTS
                and _onednn_prepack_available()):
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def apply_linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _native_rows(x, native_linear_max_rows(), layer.weight):
            return kernels.linear(x, layer.weight, bias=bias)
        if layer.packed_weight is not None and x.shape[0] <= PACKED_MAX_ROWS and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)

    def apply_experts(self, layer: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """fp32 on CPU: the native one-call MoE block (each active expert's weights read once, no per-expert
        dispatch) up to NATIVE_EXPERT_MAX_TOKENS; larger prefills, autograd (training, LoRA fine-tuning) and other
        dtypes or devices take torch's grouped GEMM or per-expert loop."""
        if _native_rows(x, NATIVE_EXPERT_MAX_TOKENS, layer.w13, layer.w2):
            return kernels.moe_experts(x, weights, layer.local_ids(ids), layer.w13, None, layer.w2, None)
        return layer.grouped_forward(x, weights, ids, self.expert, allow_grouped_mm=True)

    def native_linear(self, layer: nn.Module) -> NativeWeight:
        return NativeWeight(layer.weight, None, 0, native_linear_max_rows())

    def native_experts(self, layer: nn.Module) -> tuple[NativeWeight, NativeWeight]:
        return (NativeWeight(layer.w13, None, 0, NATIVE_EXPERT_MAX_TOKENS),
                NativeWeight(layer.w2, None, 0, NATIVE_EXPERT_MAX_TOKENS))

    def expert(self, layer: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's SwiGLU over rows x (expert numbered on this rank)."""
        gate, up = F.linear(x, layer.w13[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.w2[expert])

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


class Fp16Method(UnquantizedMethod):
    """fp32 compute on CPU with large weights stored in fbgemm's fp16 form: decode on CPU is bound by weight reads,
    and fbgemm's GEMM reads half the bytes (measured 2x faster at 1 row on the [32000, 512] lm_head, 1.6x at 8).
    Weights load in fp32 and are packed once after loading (their fp32 copy dropped); small weights, which
    fbgemm's fp16 does not speed up, and the embedding stay in fp32. The routed experts become fp16 stacks for the
    native MoE kernel (fbgemm's packed form without the extension)."""

    def create_linear(self, layer: nn.Module, rows: int, cols: int) -> None:
        super().create_linear(layer, rows, cols)
        layer.fp16_weight = None  # fbgemm-packed fp16 weight and bias

    def create_experts(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int) -> None:
        super().create_experts(layer, num_experts, hidden, intermediate)
        layer.fp16_experts = None  # per expert (w13, w2), packed

    def process_linear(self, layer: nn.Module) -> None:
        if layer.weight.numel() < PREPACK_MIN_ELEMENTS:
            return
        bias = None if layer.bias is None else layer.bias.detach()
        layer.fp16_weight = torch.ops.quantized.linear_prepack_fp16(layer.weight.detach(), bias)
        layer.weight.data = torch.empty(0)

    def native_linear(self, layer: nn.Module) -> None:
        """fbgemm's fp16 GEMM or F.linear, never the native kernel."""
        return None

    def apply_linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.fp16_weight is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, layer.fp16_weight)
        return F.linear(x, layer.weight, bias)

    def process_experts(self, layer: nn.Module) -> None:
        """With the native extension, the stacks are stored in fp16 as they are (the native MoE kernel widens them
        in registers: 1.2-1.7x faster than fbgemm's per-expert loop at 1-16 tokens, 0.9-1.0x at 64-256, 0.6-0.7x
        at 1024-2048: decode gains, prefill loses; keeping both forms would double the experts' memory); else
        large experts go to fbgemm's fp16 form."""
        if native.extension() is not None:
            layer.w13.data = layer.w13.data.half()
            layer.w2.data = layer.w2.data.half()
            return
        if layer.w13[0].numel() >= EXPERT_FP16_MIN_ELEMENTS:
            self.pack_experts_for_fbgemm(layer)

    @staticmethod
    def pack_experts_for_fbgemm(layer: nn.Module) -> None:
        pack = torch.ops.quantized.linear_prepack_fp16
        layer.fp16_experts = [(pack(layer.w13[e].contiguous(), None), pack(layer.w2[e].contiguous(), None))
                              for e in range(layer.w13.shape[0])]
        layer.w13.data = torch.empty(0)
        layer.w2.data = torch.empty(0)

    def apply_experts(self, layer: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        if layer.w13.dtype == torch.float16 and kernels.runs_native(x, layer.w13, layer.w2):
            return kernels.moe_experts(x, weights, layer.local_ids(ids), layer.w13, None, layer.w2, None)
        return layer.grouped_forward(x, weights, ids, self.expert,
                                     allow_grouped_mm=layer.fp16_experts is None and layer.w13.dtype != torch.float16)

    def expert(self, layer: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        if layer.w13.dtype == torch.float16:  # (the extension switched off after loading: widened here)
            gate, up = F.linear(x, layer.w13[expert].float()).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, layer.w2[expert].float())
        if layer.fp16_experts is None:
            return super().expert(layer, x, expert)
        w13, w2 = layer.fp16_experts[expert]
        gate, up = torch.ops.quantized.linear_dynamic_fp16(x, w13).chunk(2, dim=-1)
        return torch.ops.quantized.linear_dynamic_fp16(F.silu(gate) * up, w2)
