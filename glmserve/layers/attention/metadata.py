"""Per-step attention metadata: built once per step by the model runner, read by every attention layer.

A step's queries are flat: sequence b owns rows query_start_loc[b]:query_start_loc[b + 1], its query_lens[b] new
tokens at positions starts[b]..seq_lens[b] - 1, whose keys and values are written to slot_mapping's slots. Its
keys live in the blocks block_tables[b] names, in order (any block ids, shared with other sequences after a
prefix-cache hit). Prefill, chunked prefill, decode and verification of draft tokens are all this one shape.
`plan` holds what the step's backend derives from the above, once per step rather than once per layer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from glmserve.layers.attention.backend import AttentionBackend
    from glmserve.layers.lora import LoRABatch


@dataclass(slots=True)
class AttentionMetadata:
    backend: AttentionBackend
    starts: list[int]  # tokens of each sequence already in the cache
    query_lens: list[int]  # new tokens of each sequence this step
    seq_lens: list[int]  # starts + query_lens: keys each sequence attends to after this step
    query_start_loc: list[int]  # [B + 1] first flat row of each sequence's queries
    block_tables: torch.Tensor  # [B, max_blocks] long, rows padded with block 0 past a sequence's blocks
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    block_size: int
    plan: object = None
    lora: LoRABatch | None = None  # each row's adapter slot, set by the runner when a step runs adapters

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device, backend: AttentionBackend | None = None) -> AttentionMetadata:
        """starts[b]: tokens of sequence b already cached; query_lens[b]: new tokens this step; block_tables[b]:
        its block ids (at least enough for starts[b] + query_lens[b] tokens). backend: the default one if None."""
        if backend is None:
            from glmserve.layers.attention.selector import get_attention_backend

            backend = get_attention_backend()
        seq_lens = [s + q for s, q in zip(starts, query_lens)]
        max_blocks = -(-max(seq_lens) // block_size)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t)) for t in block_tables]
        query_start_loc = list(itertools.accumulate(query_lens, initial=0))
        # Each new token's cache slot, in plain Python: a decode step's few rows cost less so than as tensor ops
        # (each a few microseconds of dispatch), and a prefill chunk's thousands little beside its compute.
        slots = [table[p // block_size] * block_size + p % block_size
                 for table, start, q in zip(padded, starts, query_lens) for p in range(start, start + q)]
        tables = torch.tensor(padded, dtype=torch.long)
        slot_mapping = torch.tensor(slots, dtype=torch.long)
        meta = cls(backend, list(starts), list(query_lens), seq_lens, query_start_loc, tables.to(device),
                   slot_mapping.to(device), block_size)
        meta.plan = backend.plan(meta, tables, device)
        return meta
