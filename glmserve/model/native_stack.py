"""A step's decoder layers in one native call (kernels/csrc/decoder_stack.cpp), for the steps where the modules
would run every product, norm and attention on the native kernels anyway: fp32 rows on CPU, one rank, no LoRA
adapters, the cpu_native attention backend, and few enough rows that no product takes another path (each layer's
QuantMethod says up to how many: native_linear / native_experts). It composes the same kernels in the same order,
so its output equals the modules' bit for bit; what it removes is the Python and torch dispatch between them, which
took a small decode step longer than its kernels did (BENCHMARKS.md). The modules stay the reference and the path
of every other step.

The stack is handed the layers' weights and KV caches once, when first used; a StackSlot (one in Glm4MoeModel for
its layers, one in the MTP layer for itself) makes a new one when the layers' caches change. It calls no module, so
a step runs on the modules while any module of its layers has a forward hook (looked for at every step: a hook added
later is called, and once removed the stack runs again). GLMSERVE_NATIVE_STACK=0 keeps every step on the modules.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from glmserve.distributed import ParallelContext
from glmserve.kernels import NATIVE_WEIGHT_DTYPES, native
from glmserve.kernels.paged_attention import KV_DTYPES
from glmserve.layers.attention import AttentionMetadata, DenseBatch, PagedKVCache
from glmserve.layers.attention.cpu_native import NativePlan
from glmserve.layers.quantization.base import NativeWeight


def step_fits(x: torch.Tensor, meta: AttentionMetadata | DenseBatch) -> bool:
    """Whether a step's rows and metadata are of the kind the stack runs (its row count is checked apart)."""
    return (isinstance(meta, AttentionMetadata) and isinstance(meta.plan, NativePlan) and meta.lora is None
            and x.dtype == torch.float32 and x.is_cpu and not torch.is_grad_enabled())


class NativeStack:
    """The extension's DecoderStack over a model's decoder layers, and the most rows a step may have."""

    def __init__(self, stack, max_rows: float):
        self.stack, self.max_rows = stack, max_rows

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        plan: NativePlan = meta.plan
        cos, sin = rope
        return self.stack.forward(x.contiguous(), cos, sin, plan.block_tables, plan.seq_lens, plan.query_start_loc,
                                  meta.slot_mapping, meta.block_size, native.isa_index(None),
                                  native.isa_index(meta.backend.isa))


def _linear(module: nn.Module, extension) -> tuple[object, float] | None:
    """A linear layer as the stack's LinearWeights, and its row limit; None where it cannot be."""
    if module.lora is not None:
        return None
    weight = module.quant_method.native_linear(module)
    if weight is None or not _on_native_kernels(weight):
        return None
    return extension.LinearWeights(weight.weight, weight.scales, module.bias, weight.group_size), weight.max_rows


def _on_native_kernels(weight: NativeWeight) -> bool:
    return weight.weight.is_cpu and weight.weight.dtype in NATIVE_WEIGHT_DTYPES


def _layer(decoder_layer: nn.Module, extension) -> tuple[object, float] | None:
    """One Glm4MoeDecoderLayer as the stack's DecoderLayer and the most rows it takes; None where it cannot be."""
    layer = extension.DecoderLayer()
    attn, mlp = decoder_layer.self_attn, decoder_layer.mlp
    cache = attn.kv_cache
    if cache is None or cache.calculate_scales or cache.k.dtype not in KV_DTYPES or not cache.k.is_cpu:
        return None
    limits = []
    dense = mlp.shared_experts if hasattr(mlp, "shared_experts") else mlp
    for name, module in (("qkv", attn.qkv_proj), ("o_proj", attn.o_proj), ("gate_up", dense.gate_up_proj),
                         ("down", dense.down_proj)):
        linear = _linear(module, extension)
        if linear is None:
            return None
        setattr(layer, name, linear[0])
        limits.append(linear[1])
    if hasattr(mlp, "experts"):
        experts = mlp.experts
        native_experts = experts.quant_method.native_experts(experts)
        if (mlp.experts_lora is not None or native_experts is None
                or not all(_on_native_kernels(w) for w in native_experts)):
            return None
        w13, w2 = native_experts
        gate = mlp.gate
        layer.moe = True
        layer.router_weight, layer.router_bias = gate.weight, gate.e_score_correction_bias
        layer.top_k, layer.n_group, layer.topk_group = gate.top_k, gate.n_group, gate.topk_group
        layer.renormalize, layer.routed_scaling_factor = gate.norm_topk_prob, gate.routed_scaling_factor
        layer.w13, layer.w13_scales, layer.w2, layer.w2_scales = w13.weight, w13.scales, w2.weight, w2.scales
        layer.expert_group_size = w13.group_size
        limits.append(w13.max_rows)
    layer.input_norm, layer.input_norm_eps = decoder_layer.input_layernorm.weight, decoder_layer.input_layernorm.eps
    post = decoder_layer.post_attention_layernorm
    layer.post_attention_norm, layer.post_attention_norm_eps = post.weight, post.eps
    if attn.use_qk_norm:
        layer.q_norm, layer.k_norm, layer.qk_norm_eps = attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps
    layer.num_heads, layer.num_kv_heads, layer.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    layer.rotary_dim, layer.attention_scale = attn.rotary.rotary_dim, attn.scale
    layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale = cache.k, cache.v, cache.k_scale, cache.v_scale
    return layer, min(limits)


def build(decoder_layers: list[nn.Module], parallel: ParallelContext) -> NativeStack | None:
    """The stack over these layers as they are now, or None where any of them cannot run in it."""
    extension = native.extension()
    if os.environ.get("GLMSERVE_NATIVE_STACK") == "0" or extension is None or parallel.world_size > 1:
        return None
    layers, max_rows = [], math.inf
    for decoder_layer in decoder_layers:
        built = _layer(decoder_layer, extension)
        if built is None:
            return None
        layers.append(built[0])
        max_rows = min(max_rows, built[1])
    return NativeStack(extension.DecoderStack(layers), max_rows)


class StackSlot:
    """The native stack of some decoder layers, made when a step can first run in it and made anew whenever the
    layers' caches are not those it was made for."""

    def __init__(self, decoder_layers: list[nn.Module], parallel: ParallelContext):
        self.decoder_layers, self.parallel = decoder_layers, parallel
        # (the attention modules listed once: module attribute lookups cost microseconds a step)
        self.attention = [layer.self_attn for layer in decoder_layers]
        # every module's hook dicts, which torch adds to in place: one any() over them a step, without attribute lookups
        self.hook_dicts = [hooks for layer in decoder_layers for module in layer.modules()
                           for hooks in (module._forward_hooks, module._forward_pre_hooks)]
        self.stack: NativeStack | None = None
        self.caches: list[PagedKVCache | None] | None = None

    def for_step(self, x: torch.Tensor, meta: AttentionMetadata | DenseBatch) -> NativeStack | None:
        """The stack when this step can run in it, else None."""
        if not step_fits(x, meta) or any(self.hook_dicts):
            return None
        caches = [attention.kv_cache for attention in self.attention]
        if self.caches is None or any(a is not b for a, b in zip(caches, self.caches)):
            self.stack = build(self.decoder_layers, self.parallel)
            # (a cache whose FP8 scales come from its first keys is tried again at the next step)
            pending = any(c is not None and c.calculate_scales for c in caches)
            self.caches = None if pending else caches
        stack = self.stack
        return stack if stack is not None and x.shape[0] <= stack.max_rows else None
