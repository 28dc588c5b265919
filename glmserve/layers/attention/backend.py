"""The AttentionBackend seam: how a step's keys and values are written to the paged cache and attended to.

A backend is stateless; the runner picks one (--attention-backend), builds each step's AttentionMetadata with it,
and every attention layer calls `meta.backend.forward` with its own PagedKVCache. Implementations: torch_native
(the reference: gather each sequence's keys, one padded SDPA call), torch_blockwise (reads the cache block by
block in place, online softmax); native CPU and CUDA kernels plug in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from glmserve.layers.attention.kv_cache import PagedKVCache
from glmserve.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def plan(self, meta: AttentionMetadata, block_tables: torch.Tensor, device: torch.device) -> object:
        """This backend's per-step data, derived once from meta; block_tables: meta's, still on the CPU."""

    @abstractmethod
    def attend(self, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D] → [T, H, D]: each query attends to its sequence's cached keys up to its own position."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write this step's k, v [T, Hk, D] to their slots, then attend (the new tokens see each other through
        the cache, so a query reads its own key back in the cache's dtype)."""
        cache.write(k, v, meta.slot_mapping)
        return self.attend(q, cache, meta, scale)
