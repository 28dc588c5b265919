"""Paged attention: the torch reference backend (CPU, and CUDA without a fused kernel).

New keys/values are written into flat slot-indexed caches [num_slots, kv_heads, head_dim]; each sequence's keys
are then gathered through its slot table and all sequences attend in one padded SDPA call. Prefill, chunked
prefill and decode share the path: a sequence is just (start position, number of new query tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    max_query_len: int  # Q
    # Only when sequences have different query counts (None when every one has Q: no padding to add or drop):
    query_index: torch.Tensor | None  # [B, Q] flat index of each padded query row (0 where padding)
    query_unpad: torch.Tensor | None  # [T] position of each real query in the flattened [B*Q] padded rows
    kv_slots: torch.Tensor  # [B, K] cache slot of each key position (0 where padding)
    mask: torch.Tensor  # [B, 1, Q, K] True where a query may attend a key

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> "AttentionMetadata":
        """starts[b]: tokens of sequence b already cached; query_lens[b]: new tokens this step.

        Built in a few tensor ops (each costs microseconds of dispatch on CPU, and this runs once per step and
        once per MTP draft), with shorter paths when every sequence has as many new tokens (decode steps, and
        verification steps where every sequence has k drafts)."""
        batch = len(starts)
        kv_lens = [s + q for s, q in zip(starts, query_lens)]
        max_q, max_kv = max(query_lens), max(kv_lens)
        max_blocks = -(-max_kv // block_size)
        tables = torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
        kv_slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(batch, -1)[:, :max_kv]
        kv_slots = kv_slots.contiguous()  # [B, K], flattened by every layer's key gather
        query_index = query_unpad = None
        if all(q == max_q for q in query_lens):  # no padding: query j of sequence b is flat row b * Q + j
            q_pos = torch.tensor(starts, dtype=torch.long)[:, None]  # [B, Q]
            if max_q > 1:
                q_pos = q_pos + torch.arange(max_q)
            slot_mapping = kv_slots.gather(1, q_pos).view(-1)
        else:
            lens = torch.tensor([starts, query_lens], dtype=torch.long)
            q_offsets = torch.arange(max_q)
            q_valid = q_offsets < lens[1, :, None]  # [B, Q]
            # Padding rows get position 0: they see key 0 only (no all-masked NaN rows).
            q_pos = torch.where(q_valid, lens[0, :, None] + q_offsets, 0)
            query_unpad = q_valid.view(-1).nonzero().view(-1)
            query_index = torch.zeros(batch * max_q, dtype=torch.long)
            query_index[query_unpad] = torch.arange(query_unpad.shape[0])
            query_index = query_index.view(batch, max_q).to(device)
            slot_mapping = kv_slots.gather(1, q_pos).view(-1).index_select(0, query_unpad)
            query_unpad = query_unpad.to(device)
        mask = torch.arange(max_kv) <= q_pos[:, :, None]  # causal; also excludes keys past kv_len
        return cls(
            slot_mapping=slot_mapping.to(device),
            max_query_len=max_q,
            query_index=query_index,
            query_unpad=query_unpad,
            kv_slots=kv_slots.to(device),
            mask=mask.unsqueeze(1).to(device),
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hk, D]; caches: [num_slots, Hk, D]. Returns [T, H, D].

    Rows move with index_copy_/index_select, which copy whole rows: 4-7x faster on CPU than advanced indexing
    with the same indices (measured on the [B, K] key gathers of a batch-8 decode)."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    batch, max_kv = meta.kv_slots.shape
    slots = meta.kv_slots.view(-1)
    keys = k_cache.index_select(0, slots).view(batch, max_kv, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hk, K, D]
    values = v_cache.index_select(0, slots).view(batch, max_kv, *v_cache.shape[1:]).transpose(1, 2)
    max_q = meta.max_query_len
    if meta.query_index is None:  # as many queries in every sequence: [T] rows are [B, Q] already
        queries = q.view(batch, max_q, *q.shape[1:]).transpose(1, 2)
    else:
        queries = q.index_select(0, meta.query_index.view(-1)).view(batch, max_q, *q.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=True)
    out = out.transpose(1, 2).reshape(batch * max_q, *q.shape[1:])
    return out if meta.query_unpad is None else out.index_select(0, meta.query_unpad)


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
