"""Structured output in the engine: each constrained request's grammar matcher, and its rows' token bitmask.

The grammar arrives compiled (serving/structured_output.py compiles it off the engine's step) inside the request's
`SamplingParams.grammar`. The runner keeps one `GrammarState` per constrained request (vLLM v1 keeps its matchers
beside the persistent batch the same way) and, each step:

- fills one bitmask row per sampled position of a constrained request: for speculative verification, row j is
  the mask after the request's drafts[:j], found by advancing the matcher over the drafts and rolling it back.
  A draft the grammar forbids is masked out of its own row, so the rejection sampler rejects it (greedy: the
  masked argmax differs; random: its probability is 0); rows after it are discarded anyway and stay unmasked;
- applies the mask to the constrained rows of the logits, before the sampler, so the sampler, its greedy fast
  path and its logprobs (as in vLLM: masked tokens report -inf) need no change;
- advances each matcher by the tokens the step kept.

Unconstrained rows cost one attribute test each; an engine that never sees a grammar never imports xgrammar.
"""

from __future__ import annotations

import logging

import torch
import xgrammar as xgr

from glmserve.types import GrammarConstraint, Request

logger = logging.getLogger(__name__)

_BITS = 32  # xgrammar's bitmask: int32 words, bit b of word w allows token 32 * w + b


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of every token whose bit is 0 to -inf, on the given rows, in place. Plain torch: on this
    CPU it is twice as fast as xgrammar's native kernel for a 151,552-token vocabulary (BENCHMARKS.md), and it
    runs on any device (xgrammar's GPU path needs triton)."""
    shifts = torch.arange(_BITS, dtype=torch.int32)
    allowed = ((bitmask[rows].unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))


class GrammarState:
    """One request's matcher. With a start token (`</think>`), output before it (and the token itself) is free;
    every token fed is recorded, so that `rollback` can undo verified drafts."""

    def __init__(self, constraint: GrammarConstraint, stop_token_ids: list[int]):
        # The request's own stop tokens end the grammar (its eos set, and stop_token_ids); with ignore_eos and no
        # stop_token_ids, the tokenizer's eos (xgrammar refuses an empty list), which then does not stop it.
        self.matcher = xgr.GrammarMatcher(constraint.compiled, override_stop_tokens=stop_token_ids or None)
        self.start_token_id = constraint.start_token_id
        self._matched: list[bool] = []  # per token fed: whether the matcher consumed it
        self._start_index: int | None = None if self.start_token_id is not None else -1  # where the constraint began

    @property
    def active(self) -> bool:
        return self._start_index is not None

    def advance(self, token_id: int) -> bool:
        """Feed one token; False, with nothing changed, when the grammar forbids it (or has already ended)."""
        if not self.active:
            if token_id == self.start_token_id:
                self._start_index = len(self._matched)
            self._matched.append(False)
            return True
        if self.matcher.is_terminated() or not self.matcher.accept_token(token_id):
            return False
        self._matched.append(True)
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        undone = self._matched[-num_tokens:]
        del self._matched[-num_tokens:]
        if sum(undone):
            self.matcher.rollback(sum(undone))
        if self._start_index is not None and self._start_index >= len(self._matched):
            self._start_index = None

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the next token's mask into bitmask[row]; False when this position is unconstrained."""
        if not self.active or self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True


class StructuredOutputManager:
    """The runner's grammar states, by request id (vLLM v1's name for the same part)."""

    def __init__(self) -> None:
        self.states: dict[str, GrammarState] = {}

    def _state(self, request: Request) -> GrammarState:
        state = self.states.get(request.request_id)
        if state is None:
            params = request.sampling_params
            stop_ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else request.eos_token_ids))
            state = self.states[request.request_id] = GrammarState(params.grammar, stop_ids)
            for token_id in request.output_token_ids:  # normally none: states are made at the first sample
                state.advance(token_id)
        return state

    def bitmask(self, requests: list[Request], drafts: list[list[int]],
                vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
        """The bitmask of a step's sampled rows, and which rows it constrains; None when none is constrained.

        Row layout: request i has len(drafts[i]) + 1 consecutive rows, row j for the token after its output
        extended by drafts[i][:j] (plain sampling: drafts are empty, one row per request)."""
        constrained = [i for i, r in enumerate(requests) if r.sampling_params.grammar is not None]
        if not constrained:
            return None
        starts, num_rows = [], 0
        for d in drafts:
            starts.append(num_rows)
            num_rows += len(d) + 1
        bitmask = torch.full((num_rows, (vocab_size + _BITS - 1) // _BITS), -1, dtype=torch.int32)
        rows = []
        for i in constrained:
            state = self._state(requests[i])
            fed = 0
            for j in range(len(drafts[i]) + 1):
                if state.fill(bitmask, starts[i] + j):
                    rows.append(starts[i] + j)
                if j == len(drafts[i]) or not state.advance(drafts[i][j]):
                    break  # a forbidden draft: its row rejects it, the rows after it are discarded
                fed += 1
            state.rollback(fed)
        return (bitmask, rows) if rows else None

    def apply(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]) -> None:
        """Mask the constrained rows of a step's logits in place (row layout as in `bitmask`)."""
        mask = self.bitmask(requests, drafts, logits.shape[-1])
        if mask is not None:
            apply_token_bitmask(logits, *mask)

    def accept(self, requests: list[Request], sampled: list[list[int]]) -> None:
        """Advance the constrained requests' matchers by the tokens the step kept for them."""
        for request, tokens in zip(requests, sampled):
            if request.sampling_params.grammar is None:
                continue
            state = self._state(request)
            for token_id in tokens:
                if state.matcher.is_terminated():
                    break  # a stop token inside an accepted run: the request ends there, the rest is dropped
                if not state.advance(token_id):
                    # Only when no token was allowed (e.g. min_tokens masked the grammar's stop tokens).
                    logger.warning("request %s: token %d is outside its grammar", request.request_id, token_id)
                    break

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

