"""Verification of speculative draft tokens, batched over every request that has drafts.

The target model scores each request's last known token and its drafts in one forward, giving one row of
logits per draft plus a bonus row. Row j of a request is processed exactly as the plain sampler would process
the token after its output extended by drafts[:j] (penalties and min_tokens included), then:

- greedy rows accept the longest run of drafts equal to the target's argmax, then emit the argmax;
- random rows use the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept draft d with
  probability min(1, p(d) / q(d)); at the first rejection emit a sample of the residual max(p - q, 0); after
  the last draft emit a sample of p. MTP drafts are top-1, so q is a point mass on d and the rule reads: accept
  with probability p(d); on rejection sample p with d removed. Every emitted token is then distributed exactly
  as the target model alone would sample it.

A request with no drafts has just its bonus row, and draws exactly what the plain sampler draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glmserve.engine.sampler import Sampler, SamplingBatch, argmax_rows, gather_logprobs
from glmserve.types import TokenLogprobs


@dataclass(slots=True)
class VerifyOutput:
    num_emitted: Tensor  # [B] accepted drafts + 1
    token_ids: Tensor  # [R] per row: the draft where accepted, else the emitted target token
    logprobs: list[TokenLogprobs | None] | None  # per row, as the plain sampler reports them


def residual_distribution(probs: Tensor, drafts: Tensor, is_draft: Tensor) -> Tensor:
    """max(p - q, 0) for a point-mass draft q: p without the drafted token, unnormalised (the exponential race
    does not need it normalised). Bonus rows keep all of p. Overwrites `probs`."""
    p_draft = probs.gather(1, drafts)
    return probs.scatter_(1, drafts, torch.where(is_draft.unsqueeze(1), 0.0, p_draft))


class RejectionSampler:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler  # shares its per-request generators, so seeded streams continue across steps

    def __call__(self, logits: Tensor, batch: SamplingBatch, draft_ids: Tensor, row_index: Tensor) -> VerifyOutput:
        """logits: [R, V], one row per draft and one bonus row per request, a request's rows consecutive.
        draft_ids: [R] the draft each row verifies (-1 on bonus rows). row_index: [B, K + 1] each request's
        rows in order (-1 past its last)."""
        raw_logprobs = logits.float().log_softmax(dim=-1) if batch.max_num_logprobs is not None else None
        is_draft = draft_ids >= 0
        drafts = draft_ids.clamp(min=0).unsqueeze(1)
        if batch.temperature is None and not batch.edits_logits:
            target = argmax_rows(logits)
            accept, emitted = target == draft_ids, target
        else:
            edited = self.sampler.edited(logits, batch)
            target = argmax_rows(edited)
            accept, emitted = target == draft_ids, target
            if batch.temperature is not None:
                probs = self.sampler.probs(edited, batch)
                p_draft = probs.gather(1, drafts).squeeze(1)
                residual = residual_distribution(probs, drafts, is_draft)
                noise, uniform = self.sampler.draw(residual, batch, is_draft.tolist())
                recovered = argmax_rows(residual.div_(noise))
                random_rows = ~batch.greedy_rows if batch.greedy_rows is not None else torch.ones_like(is_draft)
                accept = torch.where(random_rows, uniform < p_draft, accept)
                emitted = torch.where(random_rows, recovered, target)
        accept &= is_draft
        # A request keeps the drafts before its first rejection, then one emitted token.
        valid = row_index >= 0
        accepted_run = (accept[row_index.clamp(min=0)] & valid).int().cumprod(dim=1)
        num_accepted = accepted_run.sum(dim=1)
        token_ids = torch.where(accept, draft_ids, emitted)
        logprobs = None if raw_logprobs is None else gather_logprobs(raw_logprobs, token_ids, batch)
        return VerifyOutput(num_emitted=num_accepted + 1, token_ids=token_ids, logprobs=logprobs)
