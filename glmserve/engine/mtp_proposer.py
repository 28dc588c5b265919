"""Draft tokens from GLM-4.5's MTP layer (model.layers.{num_hidden_layers}), chained k steps, top-1.

At position i the MTP layer reads the target's hidden state h[i] and the token at i + 1 and predicts the token
at i + 2 (the objective it was trained on). Every step it runs over every position the target computed and
kept this step (so its own KV cache stays complete, prefill chunks included); the kept positions end with the
token just emitted, so its last row predicts the first draft. Each further draft feeds the MTP layer its own
output hidden state and the previous draft, one position on; those positions' KV lives in lookahead slots the
scheduler reserves (k - 1 beyond the chunk) and is rewritten by the next step's pass once the target has
verified them.

A prefix-cache hit reuses the MTP KV of the request that computed the block; at a block's last position that
KV was made with that request's next token, which can differ. This only changes drafts, never outputs.
"""

from __future__ import annotations

import itertools

import torch

from glmserve.layers.attention import AttentionMetadata
from glmserve.model.glm4_moe import Glm4MoeMTPLayer


class MTPProposer:
    def __init__(self, mtp: Glm4MoeMTPLayer, num_speculative_tokens: int, block_size: int,
                 max_positions: int, device: torch.device):
        self.mtp = mtp
        self.k = num_speculative_tokens
        self.block_size = block_size
        self.max_position = max_positions - 1
        self.device = device

    def propose(self, starts: list[int], next_token_ids: list[list[int]], hidden: torch.Tensor,
                block_tables: list[list[int]], drafting: list[bool]) -> list[list[int]]:
        """One MTP pass over each request's kept positions, then k - 1 chained single-token steps.

        starts[b]: first position request b computed this step; next_token_ids[b]: for each kept position i,
        the token at i + 1; hidden: the target's kept hidden states, requests one after another. Returns k
        drafts for each request with `drafting` set, [] for the others (prefill chunks that did not finish).
        """
        lengths = [len(t) for t in next_token_ids]
        # Positions and row indices in Python lists (one tensor each): this runs k times a step, and each small
        # tensor op costs microseconds of dispatch.
        positions = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
        token_ids = torch.tensor([t for ids in next_token_ids for t in ids], dtype=torch.long, device=self.device)
        meta = AttentionMetadata.build(starts, lengths, block_tables, self.block_size, self.device)
        out = self.mtp(torch.tensor(positions, device=self.device), token_ids, hidden, meta)

        rows = [b for b, d in enumerate(drafting) if d]
        if not rows:
            return [[] for _ in starts]
        ends = list(itertools.accumulate(lengths))
        last = [ends[b] - 1 for b in rows]  # each drafting request's last kept row
        h = out.index_select(0, torch.tensor(last, device=self.device))
        pos = [positions[i] for i in last]
        draft = self.mtp.compute_logits(h).argmax(dim=-1)
        drafts = [draft]
        tables = [block_tables[b] for b in rows]
        for _ in range(self.k - 1):
            # Past the model's last position the drafts are capped away anyway; clamp to stay in the RoPE table.
            pos = [min(p + 1, self.max_position) for p in pos]
            step_meta = AttentionMetadata.build(pos, [1] * len(rows), tables, self.block_size, self.device)
            h = self.mtp(torch.tensor(pos, device=self.device), draft, h, step_meta)
            draft = self.mtp.compute_logits(h).argmax(dim=-1)
            drafts.append(draft)
        per_row = torch.stack(drafts, dim=1).tolist()
        result: list[list[int]] = [[] for _ in starts]
        for b, row in zip(rows, per_row):
            result[b] = row
        return result
