"""torch_blockwise: attention that reads the paged cache in place, a chunk of blocks at a time (flash-decoding in
torch ops), without gathering any sequence's whole context or building a mask as long as it.

Keys and values are read `CHUNK_TOKENS` at a time through the block tables; each chunk's attention is folded into
a running (max, sum, accumulator) per query, in fp32 (online softmax). GQA maps query head h to KV head h // G
without repeating KV. Short queries (decode, verification of drafts, small chunks) are batched, sequences ordered
longest first, so a chunk past the shorter ones' ends reads only the longer ones; a causal mask is built per chunk,
and only where a key may lie past a query. Long queries (prefill chunks) go one sequence at a time: the keys before
the chunk unmasked, then the chunk's own keys with a square causal mask. On CPU each chunk runs through torch's
fused flash kernel, which returns its log-sum-exp for the merge; elsewhere (and in tests, to check it) the short
path computes the chunk's scores and softmax in torch ops, grouping each KV head's G query heads ([B, Hk, G*Q, D]).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from glmserve.layers.attention.backend import AttentionBackend
from glmserve.layers.attention.kv_cache import PagedKVCache
from glmserve.layers.attention.metadata import AttentionMetadata

# A flash kernel that returns the log-sum-exp with the output (CPU; fp32 and bf16).
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(slots=True)
class ShortQueries:
    """Sequences attended together, longest first, their queries padded to the longest query (Qp)."""

    seqs: list[int]  # indices into the step's sequences
    padded_len: int  # Qp
    rows: torch.Tensor  # [Bg * Qp] flat query row of each padded row (a padding row repeats its sequence's last)
    keep: torch.Tensor | None  # [n] padded rows that are real queries (None: all are)
    out_rows: torch.Tensor  # [n] flat output row of each real query
    positions: torch.Tensor  # [Bg, Qp] position of each padded query row
    block_tables: torch.Tensor  # [Bg, max_blocks]
    seq_lens: list[int]  # descending
    min_starts: list[int]  # [i]: the smallest query position among the first i + 1 sequences


@dataclass(slots=True)
class LongQuery:
    seq: int
    row: int  # first flat query row
    start: int  # position of the first query
    num_queries: int


@dataclass(slots=True)
class BlockwisePlan:
    short: ShortQueries | None
    long: list[LongQuery]


class TorchBlockwiseBackend(AttentionBackend):
    name = "torch_blockwise"
    CHUNK_TOKENS = 4096  # keys read per chunk (rounded down to whole blocks)
    MAX_SHORT_QUERY = 16  # longer queries (prefill chunks) take the per-sequence long path
    MAX_SCORES = 1 << 24  # scores per chunk on the short path (64 MiB): large batches read fewer keys per chunk
    use_cpu_flash = True  # the long path's fused kernel on CPU (tests turn it off to check the other path)

    def plan(self, meta: AttentionMetadata, block_tables: torch.Tensor, device: torch.device) -> BlockwisePlan:
        short = [b for b, q in enumerate(meta.query_lens) if q <= self.MAX_SHORT_QUERY]
        long = [LongQuery(b, meta.query_start_loc[b], meta.starts[b], q) for b, q in enumerate(meta.query_lens)
                if q > self.MAX_SHORT_QUERY]
        return BlockwisePlan(_plan_short(meta, short, block_tables, device) if short else None, long)

    def attend(self, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.attend_planned(q.new_empty(q.shape), q, cache, meta, meta.plan, scale)

    def attend_planned(self, out: torch.Tensor, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata,
                       plan: BlockwisePlan, scale: float) -> torch.Tensor:
        """attend with the given plan (another backend's share of the step), into out's rows that plan names."""
        flash = self.use_cpu_flash and _cpu_flash is not None and q.device.type == "cpu" and q.dtype in (
            torch.float32, torch.bfloat16)
        if plan.short is not None:
            group = plan.short
            attend_short = self._attend_short_flash if flash else self._attend_short
            rows = attend_short(q.index_select(0, group.rows), group, cache, scale)
            out.index_copy_(0, group.out_rows, rows if group.keep is None else rows.index_select(0, group.keep))
        for item in plan.long:
            queries = q[item.row : item.row + item.num_queries]
            table = meta.block_tables[item.seq]
            if flash:
                result = _attend_long_flash(queries, table, item.start, cache, scale, self.CHUNK_TOKENS)
            else:  # a group of one, no padding
                group = ShortQueries([item.seq], item.num_queries, torch.empty(0), None, torch.empty(0),
                                     item.start + torch.arange(item.num_queries, device=q.device)[None],
                                     table[None], [item.start + item.num_queries], [item.start])
                result = self._attend_short(queries, group, cache, scale)
            out[item.row : item.row + item.num_queries] = result
        return out

    def _attend_short(self, q: torch.Tensor, group: ShortQueries, cache: PagedKVCache, scale: float) -> torch.Tensor:
        """q: [Bg * Qp, H, D], padded rows in group order → [Bg * Qp, H, D]."""
        batch, qp = len(group.seqs), group.padded_len
        num_heads, head_dim = q.shape[1:]
        kv_heads = cache.k.shape[1]
        g = num_heads // kv_heads
        # Query head h reads KV head h // g: [Bg, Qp, Hk, G, D] → [Bg, Hk, G * Qp, D], row r = j + Qp * (G index).
        qg = q.view(batch, qp, kv_heads, g, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, g * qp, head_dim)
        qg = qg.float() * (scale * cache.k_scale)
        row_positions = group.positions.repeat(1, g)[:, None, :, None]  # [Bg, 1, G * Qp, 1]
        bs = cache.block_size
        chunk_blocks = max(1, min(self.CHUNK_TOKENS, self.MAX_SCORES // (batch * num_heads * qp)) // bs)
        k_blocks, v_blocks = cache.blocks(cache.k), cache.blocks(cache.v)
        descending = [-n for n in group.seq_lens]
        m = l = acc = None
        for first_block in range(0, -(-group.seq_lens[0] // bs), chunk_blocks):
            key_start = first_block * bs
            active = bisect.bisect_left(descending, -key_start)  # sequences with keys at or past key_start
            key_end = min(key_start + chunk_blocks * bs, group.seq_lens[0])
            ids = group.block_tables[:active, first_block : first_block + chunk_blocks].reshape(-1)
            keys = _read(cache, k_blocks, ids, active, key_end - key_start, torch.float32)  # [a, C, Hk, D]
            values = _read(cache, v_blocks, ids, active, key_end - key_start, torch.float32).transpose(1, 2)
            scores = torch.matmul(qg[:active], keys.permute(0, 2, 3, 1))  # [a, Hk, G * Qp, C]
            if key_end - 1 > group.min_starts[active - 1]:  # a key may lie past some query: mask it
                key_pos = torch.arange(key_start, key_end, device=q.device)
                scores.masked_fill_(key_pos > row_positions[:active], float("-inf"))
            if m is None:  # chunk 0 holds key 0, which every query sees: the running max is finite from here on
                m = scores.amax(-1, keepdim=True)
                p = scores.sub_(m).exp_()
                l, acc = p.sum(-1, keepdim=True), torch.matmul(p, values)
                continue
            m_new = torch.maximum(m[:active], scores.amax(-1, keepdim=True))
            p = scores.sub_(m_new).exp_()
            alpha = torch.exp(m[:active] - m_new)
            l[:active] = l[:active] * alpha + p.sum(-1, keepdim=True)
            acc[:active] = acc[:active] * alpha + torch.matmul(p, values)
            m[:active] = m_new
        out = acc.div_(l).mul_(cache.v_scale) if cache.v_scale != 1.0 else acc.div_(l)
        out = out.view(batch, kv_heads, g, qp, head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(batch * qp, num_heads, head_dim).to(q.dtype)


    def _attend_short_flash(self, q: torch.Tensor, group: ShortQueries, cache: PagedKVCache,
                            scale: float) -> torch.Tensor:
        """_attend_short through torch's fused CPU flash kernel, one call per key chunk, merged by log-sum-exp: no
        pass over the scores in torch ops, and keys and values are read where the chunk's gather left them."""
        batch, qp = len(group.seqs), group.padded_len
        num_heads, head_dim = q.shape[1:]
        queries = q.view(batch, qp, num_heads, head_dim).transpose(1, 2)  # [Bg, H, Qp, D]
        k_blocks, v_blocks = cache.blocks(cache.k), cache.blocks(cache.v)
        bs = cache.block_size
        chunk_blocks = max(1, self.CHUNK_TOKENS // bs)
        descending = [-n for n in group.seq_lens]
        state = None
        for first_block in range(0, -(-group.seq_lens[0] // bs), chunk_blocks):
            key_start = first_block * bs
            active = bisect.bisect_left(descending, -key_start)
            key_end = min(key_start + chunk_blocks * bs, group.seq_lens[0])
            ids = group.block_tables[:active, first_block : first_block + chunk_blocks].reshape(-1)
            keys = _read(cache, k_blocks, ids, active, key_end - key_start, q.dtype).transpose(1, 2)  # [a, Hk, C, D]
            values = _read(cache, v_blocks, ids, active, key_end - key_start, q.dtype).transpose(1, 2)
            mask = hidden = None
            if key_end - 1 > group.min_starts[active - 1]:  # a key may lie past some query: mask it
                key_pos = torch.arange(key_start, key_end, device=q.device)
                hidden = key_pos > group.positions[:active, None, :, None]  # [a, 1, Qp, C]
                mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
            out, lse = _cpu_flash(queries[:active], keys, values, 0.0, False, attn_mask=mask,
                                  scale=scale * cache.k_scale)
            lse = lse[..., None]  # [a, H, Qp, 1]
            if hidden is not None:  # the kernel gives a query that sees no key here lse 0: it must weigh nothing
                lse = lse.masked_fill(hidden.all(-1, keepdim=True), float("-inf"))
            state = _merge(state, active, out.float(), lse)
        _, l, acc = state
        out = acc.div_(l).mul_(cache.v_scale) if cache.v_scale != 1.0 else acc.div_(l)
        return out.transpose(1, 2).reshape(batch * qp, num_heads, head_dim).to(q.dtype)


def _merge(state: tuple | None, active: int, out: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Fold one key chunk's attention (out, normalised, and its log-sum-exp) for the first `active` sequences into
    the running (max, sum, accumulator). Chunk 0 holds key 0, which every query sees: it starts the state."""
    if state is None:
        return lse, torch.ones_like(lse), out
    m, l, acc = state
    m_new = torch.maximum(m[:active], lse)
    alpha, beta = torch.exp(m[:active] - m_new), torch.exp(lse - m_new)
    l[:active] = l[:active] * alpha + beta
    acc[:active] = acc[:active] * alpha + out * beta
    m[:active] = m_new
    return m, l, acc


def _read(cache: PagedKVCache, blocks: torch.Tensor, ids: torch.Tensor, batch: int, num_tokens: int,
          dtype: torch.dtype) -> torch.Tensor:
    """The blocks `ids` ([batch * n] block ids, n per sequence) of a [num_blocks, bs, Hk, D] cache as
    [batch, num_tokens, Hk, D] in dtype: only this chunk is copied, and only its first num_tokens keys kept."""
    chunk = blocks.index_select(0, ids)
    chunk = chunk.view(batch, -1, *blocks.shape[2:])[:, :num_tokens]
    return cache.dequantize(chunk, dtype)


def _attend_long_flash(q: torch.Tensor, table: torch.Tensor, start: int, cache: PagedKVCache, scale: float,
                       chunk_tokens: int) -> torch.Tensor:
    """One sequence's queries at positions start..start + Q - 1 ([Q, H, D]) over its keys 0..start + Q - 1.

    Keys before `start` are seen by every query: they go chunk_tokens at a time, unmasked. The last Q keys are the
    queries' own: one causal call, whose top-left-aligned mask is exactly right since it is square. Each call
    returns its output and log-sum-exp; the outputs are merged weighted by exp(lse - running max)."""
    num_queries = q.shape[0]
    queries = q.transpose(0, 1)[None]  # [1, H, Q, D]; the kernel maps head h to KV head h // G itself
    k_blocks, v_blocks = cache.blocks(cache.k), cache.blocks(cache.v)
    step = max(1, chunk_tokens // cache.block_size) * cache.block_size
    ranges = [(a, min(a + step, start), False) for a in range(0, start, step)]
    ranges.append((start, start + num_queries, True))
    state = None
    for key_start, key_end, causal in ranges:
        first, last = key_start // cache.block_size, -(-key_end // cache.block_size)
        skip = key_start - first * cache.block_size
        ids = table[first:last]
        keys = _read(cache, k_blocks, ids, 1, skip + key_end - key_start, q.dtype)[:, skip:].transpose(1, 2)
        values = _read(cache, v_blocks, ids, 1, skip + key_end - key_start, q.dtype)[:, skip:].transpose(1, 2)
        out, lse = _cpu_flash(queries, keys, values, 0.0, causal, scale=scale * cache.k_scale)
        state = _merge(state, 1, out.float(), lse[..., None])  # [1, H, Q, D], [1, H, Q, 1]
    _, l, acc = state
    result = acc / l
    if cache.v_scale != 1.0:
        result = result * cache.v_scale
    return result[0].transpose(0, 1).to(q.dtype)


def _plan_short(meta: AttentionMetadata, seqs: list[int], block_tables: torch.Tensor,
                device: torch.device) -> ShortQueries:
    seqs = sorted(seqs, key=lambda b: -meta.seq_lens[b])
    qp = max(meta.query_lens[b] for b in seqs)
    rows, positions, keep, out_rows = [], [], [], []
    for i, b in enumerate(seqs):
        n, first = meta.query_lens[b], meta.query_start_loc[b]
        for j in range(qp):  # a padding row repeats the sequence's last query (its result is dropped)
            real = j < n
            rows.append(first + min(j, n - 1))
            positions.append(meta.starts[b] + min(j, n - 1))
            if real:
                keep.append(i * qp + j)
                out_rows.append(first + j)
    min_starts, low = [], None
    for b in seqs:
        low = meta.starts[b] if low is None else min(low, meta.starts[b])
        min_starts.append(low)
    index = torch.tensor(seqs, dtype=torch.long)
    return ShortQueries(
        seqs=seqs,
        padded_len=qp,
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        keep=None if len(keep) == len(rows) else torch.tensor(keep, dtype=torch.long, device=device),
        out_rows=torch.tensor(out_rows, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device).view(len(seqs), qp),
        block_tables=block_tables.index_select(0, index).to(device),
        seq_lens=[meta.seq_lens[b] for b in seqs],
        min_starts=min_starts,
    )
