"""How many KV-cache blocks a memory budget holds, and how the pool is described in logs and /metrics.

Pure Python (the runner passes the storage dtype's name and size), so the arithmetic is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    dtype: str  # the storage dtype: "float32", "bfloat16", "float8_e4m3fn", ...
    block_size: int  # tokens per block
    num_blocks: int
    bytes_per_token: int  # K and V of every cached layer

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def describe(self) -> str:
        return (f"KV cache: {self.dtype}, {self.num_blocks} blocks of {self.block_size} tokens, "
                f"{self.num_tokens} tokens ({self.num_blocks * self.bytes_per_block / 2**20:.1f} MiB, "
                f"{self.bytes_per_token} bytes per token)")


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of one token in every layer that caches (the MTP layer too when it drafts)."""
    return 2 * num_layers * kv_heads * head_dim * itemsize


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    return budget_bytes // (block_size * bytes_per_token)
