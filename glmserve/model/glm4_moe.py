"""Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air), written with Hugging Face attribute names.

Module paths mirror the checkpoint's tensor names (model.layers.{i}.self_attn.o_proj, ...) so the loader's
mapping is short: only q/k/v → qkv_proj, gate/up → gate_up_proj and per-expert tensors → stacked experts differ.
Inputs are flat: all tokens of all sequences in one [T] vector, with their positions.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from glmserve import kernels
from glmserve.config import ModelConfig
from glmserve.distributed import ParallelContext
from glmserve.layers.attention import (
    AttentionMetadata,
    DenseBatch,
    PagedKVCache,
    dense_causal_attention,
)
from glmserve.layers.embedding import VocabEmbedding
from glmserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from glmserve.layers.lora import ExpertLoRASlots, LoRABatch, experts_with_lora
from glmserve.layers.moe import FusedExperts, TopkRouter
from glmserve.layers.norm import RMSNorm
from glmserve.layers.quantization import QuantMethod
from glmserve.layers.rotary import PartialRotaryEmbedding
from glmserve.model import native_stack

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) rows of this step's positions


def _lora(meta: AttentionMetadata | DenseBatch) -> LoRABatch | None:
    """The step's rows' adapter slots (serving with LoRA adapters), or None."""
    return getattr(meta, "lora", None)


class Glm4MoeAttention(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, rotary: PartialRotaryEmbedding,
                 quant: QuantMethod | None = None):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, config.attention_bias, parallel, quant)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        bias=False, parallel=parallel, quant_method=quant)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        self.scale = config.head_dim**-0.5
        # This layer's paged KV cache, allocated by the model runner; the step's backend reads and writes it.
        self.kv_cache: PagedKVCache | None = None
        # FP8 KV-cache scales (stored = value / scale): the checkpoint's k_scale / v_scale when it has them.
        self.k_scale = self.v_scale = 1.0

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata | DenseBatch) -> torch.Tensor:
        lora = _lora(meta)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.use_qk_norm else (None, None)
        # QK-norm (per head, after the bias and before RoPE) and RoPE in one call
        q, k, v = self.rotary.qk_norm_rope(rope, self.qkv_proj(x, lora), *norms, self.num_heads, self.num_kv_heads,
                                           self.q_norm.eps if self.use_qk_norm else 0.0)
        if isinstance(meta, DenseBatch):
            out = dense_causal_attention(q, k, v, meta, self.scale)
        else:
            out = meta.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(out.shape[0], -1), lora)


class Glm4MoeMLP(nn.Module):
    """Dense SwiGLU (also the shared expert)."""

    def __init__(self, hidden: int, intermediate: int, parallel: ParallelContext, quant: QuantMethod | None = None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=False, parallel=parallel,
                                                       quant_method=quant)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False, parallel=parallel, quant_method=quant)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x, lora)), lora)


class Glm4MoeMoE(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, quant: QuantMethod | None = None):
        super().__init__()
        self.gate = TopkRouter(config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                               config.n_group, config.topk_group, config.norm_topk_prob,
                               config.routed_scaling_factor)
        self.experts = FusedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                    parallel, quant)
        self.shared_experts = Glm4MoeMLP(config.hidden_size,
                                         config.moe_intermediate_size * config.n_shared_experts, parallel, quant)

    # With LoRA serving: the routed experts' adapter weights (the experts' rows then take the LoRA path).
    experts_lora: ExpertLoRASlots | None = None

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        weights, ids = self.gate(x)
        if lora is not None and self.experts_lora is not None and self.experts_lora.targets(lora):
            routed = experts_with_lora(self.experts, self.experts_lora, x, weights, ids, lora)
        else:
            routed = self.experts(x, weights, ids)
        return routed + self.shared_experts(x, lora)


class Glm4MoeDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelContext,
                 rotary: PartialRotaryEmbedding, quant: QuantMethod | None = None):
        super().__init__()
        self.self_attn = Glm4MoeAttention(config, parallel, rotary, quant)
        self.mlp = (Glm4MoeMoE(config, parallel, quant) if config.is_moe_layer(layer_idx)
                    else Glm4MoeMLP(config.hidden_size, config.intermediate_size, parallel, quant))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope: Rope, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata | DenseBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the residual is carried from layer to layer and
        each add is fused into the next norm, as vLLM's layers do; None in the first layer: x is the stream."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(rope, h, meta), residual)
        return self.mlp(h, _lora(meta)), residual


class Glm4MoeMTPLayer(Glm4MoeDecoderLayer):
    """The multi-token-prediction layer stored as model.layers.{num_hidden_layers}: a full MoE decoder layer
    fed by eh_proj([enorm(embed(next token)), hnorm(target hidden)]), with its own head.

    Its weights are loaded with the model; engine/mtp_proposer.py drives it for speculative decoding.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelContext, rotary: PartialRotaryEmbedding,
                 quant: QuantMethod | None = None):
        super().__init__(config, config.num_hidden_layers, parallel, rotary, quant)
        hidden = config.hidden_size
        self.embed_tokens = VocabEmbedding(config.vocab_size, hidden, quant and quant.vocab_method)
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden, quant_method=quant)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.shared_head.head = ReplicatedLinear(hidden, config.vocab_size, quant_method=quant and quant.vocab_method)
        self.native_stack = native_stack.StackSlot([self], parallel)

    def forward(self, positions: torch.Tensor, token_ids: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata | DenseBatch) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(token_ids)), self.hnorm(hidden)], dim=-1))
        rope = self.self_attn.rotary.lookup(positions, x.dtype)
        stack = self.native_stack.for_step(x, meta)
        if stack is not None:
            return stack(x, rope, meta)
        out, residual = super().forward(rope, x, None, meta)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(hidden))


def stage_layers(num_hidden_layers: int, pp_rank: int, pp_size: int) -> range:
    """The decoder layers pipeline stage pp_rank holds: an even split, the remainder on the earlier stages (the
    last one also holds the norm, the LM head and the MTP layer)."""
    if pp_size > num_hidden_layers:
        raise ValueError(f"--pipeline-parallel-size {pp_size} exceeds the model's {num_hidden_layers} layers")
    base, extra = divmod(num_hidden_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


class MissingLayer(nn.Module):
    """A layer another pipeline stage holds: it keeps the layer numbering (module paths stay the checkpoint's
    tensor names) and holds nothing."""


class Glm4MoeModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, quant: QuantMethod | None = None):
        super().__init__()
        self.rotary = PartialRotaryEmbedding(config.head_dim, config.rotary_dim, config.max_position_embeddings,
                                             config.rope_theta)
        self.held = stage_layers(config.num_hidden_layers, parallel.pp_rank, parallel.pp_size)
        self.embed_tokens = (VocabEmbedding(config.vocab_size, config.hidden_size, quant and quant.vocab_method)
                             if parallel.is_first_stage else None)
        layers: list[nn.Module] = [Glm4MoeDecoderLayer(config, i, parallel, self.rotary, quant) if i in self.held
                                   else MissingLayer() for i in range(config.num_hidden_layers)]
        if config.num_nextn_predict_layers > 0:
            layers.append(Glm4MoeMTPLayer(config, parallel, self.rotary, quant) if parallel.is_last_stage
                          else MissingLayer())
        self.layers = nn.ModuleList(layers)
        self.num_hidden_layers = config.num_hidden_layers
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage else None
        self.native_stack = native_stack.StackSlot([self.layers[i] for i in self.held], parallel)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | DenseBatch) -> torch.Tensor:
        """inputs: token ids on the first pipeline stage, the previous stage's hidden states on the others.
        Returns this stage's last layer's hidden states, before the final norm (what the MTP layer reads)."""
        x = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        rope = self.rotary.lookup(positions, x.dtype)  # once per step, shared by every layer
        stack = self.native_stack.for_step(x, meta)
        if stack is not None:
            return stack(x, rope, meta)
        residual = None
        for i in self.held:
            x, residual = self.layers[i](rope, x, residual, meta)
        return x + residual


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext | None = None, quant: QuantMethod | None = None):
        """quant: the weight format of every linear layer, the routed experts and the embeddings (default float).
        parallel: with pp_size > 1, only this pipeline stage's layers are built."""
        super().__init__()
        parallel = parallel or ParallelContext()
        self.config = config
        self.model = Glm4MoeModel(config, parallel, quant)
        self.lm_head = (ReplicatedLinear(config.hidden_size, config.vocab_size,
                                         quant_method=quant and quant.vocab_method)
                        if parallel.is_last_stage else None)

    def holds(self, tensor_name: str) -> bool:
        """Whether this pipeline stage holds the checkpoint tensor (the loader skips the others' unread)."""
        layer = _LAYER_NAME.match(tensor_name)
        if layer:  # (a layer past the model's is an MTP layer not asked for: the loader skips it)
            index = int(layer.group(1))
            return index >= len(self.model.layers) or not isinstance(self.model.layers[index], MissingLayer)
        if tensor_name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if tensor_name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is not None
        return True

    @property
    def mtp_layer(self) -> Glm4MoeMTPLayer | None:
        layers = self.model.layers
        mtp = layers[-1] if len(layers) > self.config.num_hidden_layers else None
        return mtp if isinstance(mtp, Glm4MoeMTPLayer) else None

    @property
    def attention_layers(self) -> list[Glm4MoeAttention]:
        """This stage's decoder layers' attention (the MTP layer's cache is set up by the speculative path)."""
        return [self.model.layers[i].self_attn for i in self.model.held]

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | DenseBatch) -> torch.Tensor:
        return self.model(inputs, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))
