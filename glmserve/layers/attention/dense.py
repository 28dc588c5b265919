"""Attention without a KV cache, for training and scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True, frozen=True)
class DenseBatch:
    """Training and scoring without a KV cache: `batch_size` equal-length sequences, flattened row-major."""

    batch_size: int


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: DenseBatch,
                           scale: float) -> torch.Tensor:
    """q: [B*S, H, D]; k, v: [B*S, Hk, D]. Plain causal SDPA over each sequence (differentiable)."""
    b = batch.batch_size

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)
