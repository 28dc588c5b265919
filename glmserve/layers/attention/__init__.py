"""Attention: the AttentionBackend seam over the paged KV cache, its backends, and cache-free dense attention."""

from glmserve.layers.attention.backend import AttentionBackend
from glmserve.layers.attention.dense import DenseBatch, dense_causal_attention
from glmserve.layers.attention.kv_cache import PagedKVCache, kv_storage_dtype
from glmserve.layers.attention.metadata import AttentionMetadata
from glmserve.layers.attention.selector import ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND, get_attention_backend

__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionMetadata",
    "DenseBatch",
    "PagedKVCache",
    "dense_causal_attention",
    "get_attention_backend",
    "kv_storage_dtype",
]
