"""Draft tokens from GLM-4.5's MTP layer (model.layers.{num_hidden_layers}), chained k steps, top-1.

At position i the MTP layer reads the target's hidden state h[i] and the token at i + 1 and predicts the token
at i + 2 (the objective it was trained on). Every step it runs over every row the target computed, with the
target's own positions and attention metadata (so its KV cache stays complete, prefill chunks included, and no
second metadata is built). A request's kept rows end with the token just emitted, so the last kept row predicts
the first draft. Rows past the kept run (rejected drafts) are fed a placeholder token: their MTP KV is causal
to everything kept, and the next step rewrites it before anything reads it. Each further draft feeds the MTP
layer its own output hidden state and the previous draft, one position on; those positions' KV lives in
lookahead slots the scheduler reserves (k - 1 beyond the chunk) and is likewise rewritten once verified.

A prefix-cache hit reuses the MTP KV of the request that computed the block; at a block's last position that
KV was made with that request's next token, which can differ. This only changes drafts, never outputs.
"""

from __future__ import annotations

import torch

from glmserve.engine.sampler import argmax_rows
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

    def propose(self, positions: torch.Tensor, next_token_ids: list[int], hidden: torch.Tensor,
                 meta: AttentionMetadata, last_rows: list[int], last_positions: list[int],
                 block_tables: list[list[int]]) -> list[list[int]]:
        """One MTP pass over the target's rows, then k - 1 chained single-token steps.

        positions, hidden, meta: the target's, for all its rows; next_token_ids: for each row, the token after
        it. last_rows[d], last_positions[d], block_tables[d]: drafting request d's last kept row, its position
        and its blocks. Returns k drafts per drafting request.
        """
        token_ids = torch.tensor(next_token_ids, dtype=torch.long, device=self.device)
        out = self.mtp(positions, token_ids, hidden, meta)
        if not last_rows:
            return []
        h = out.index_select(0, torch.tensor(last_rows, device=self.device))
        draft = argmax_rows(self.mtp.compute_logits(h))
        drafts = [draft]
        # Positions stay in a Python list: each small tensor op costs microseconds of dispatch, k times a step.
        pos = last_positions
        for _ in range(self.k - 1):
            # Past the model's last position the drafts are capped away anyway; clamp to stay in the RoPE table.
            pos = [min(p + 1, self.max_position) for p in pos]
            step_meta = AttentionMetadata.build(pos, [1] * len(pos), block_tables, self.block_size, self.device,
                                                meta.backend)
            h = self.mtp(torch.tensor(pos, device=self.device), draft, h, step_meta)
            draft = argmax_rows(self.mtp.compute_logits(h))
            drafts.append(draft)
        return torch.stack(drafts, dim=1).tolist()
