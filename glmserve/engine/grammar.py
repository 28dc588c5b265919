"""Structured output in the engine: each constrained request's grammar matcher, and its rows' token bitmask.

The grammar arrives compiled (serving/structured_output.py compiles it off the engine's step) inside the request's
`SamplingParams.grammar`. The engine keeps one `GrammarState` per constrained request beside its scheduler, as
vLLM v1 does (its scheduler's StructuredOutputManager), made when the engine takes the request in, and, each step
that schedules one:

- fills one bitmask row per sampled position of a constrained request: for speculative verification, row j is
  the mask after the request's drafts[:j], found by advancing the matcher over the drafts and rolling it back.
  A draft the grammar forbids is masked out of its own row, so the rejection sampler rejects it (greedy: the
  masked argmax differs; random: its probability is 0); rows after it are discarded anyway and stay unmasked;
- sends the bitmask with the step (`SchedulerOutput.grammar_bitmask`): every rank that samples (one process; every
  tensor-parallel rank; the last pipeline stage's ranks) applies it to the constrained rows of the logits before
  the sampler, so all sample the same tokens, and the sampler, its greedy fast path and its logprobs (as in vLLM:
  masked tokens report -inf) need no change;
- advances each matcher by the tokens the step kept (rank 0 gets them in the step's result).

Only rank 0 holds matchers, so a compiled grammar never travels to the other ranks. A data-parallel replica is an
engine of its own: the front sends it the grammar serialized (`SerializedGrammar`; the vocabulary only with the
first grammar that replica gets), and it matches it itself. While no constrained request is in the engine, a step
does no grammar work; otherwise unconstrained rows cost one attribute test each; an engine that never sees a grammar
never imports xgrammar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import xgrammar as xgr

from glmserve.engine.token_bitmask import BITS
from glmserve.types import GrammarConstraint, Request, SchedulerOutput, StepOutput

logger = logging.getLogger(__name__)

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
    """The engine's grammar states, by request id (vLLM v1's name for the same part)."""

    def __init__(self) -> None:
        self.states: dict[str, GrammarState] = {}

    def add(self, request: Request) -> None:
        """A matcher for a constrained request, made when the engine takes the request in."""
        params = request.sampling_params
        stop_ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else request.eos_token_ids))
        self.states[request.request_id] = GrammarState(params.grammar, stop_ids)

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
        bitmask = torch.full((num_rows, (vocab_size + BITS - 1) // BITS), -1, dtype=torch.int32)
        rows = []
        for i in constrained:
            state = self.states[requests[i].request_id]
            fed = 0
            for j in range(len(drafts[i]) + 1):
                if state.fill(bitmask, starts[i] + j):
                    rows.append(starts[i] + j)
                if j == len(drafts[i]) or not state.advance(drafts[i][j]):
                    break  # a forbidden draft: its row rejects it, the rows after it are discarded
                fed += 1
            state.rollback(fed)
        return (bitmask, rows) if rows else None

    def step_bitmask(self, scheduler_output: SchedulerOutput,
                     vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
        """`bitmask` over a step's sampling chunks, in the runner's row order (model_runner.py)."""
        sampling = [c for c in scheduler_output.chunks if c.sample]
        return self.bitmask([c.request for c in sampling], [c.draft_token_ids for c in sampling], vocab_size)

    def accept_step(self, scheduler_output: SchedulerOutput, step_output: StepOutput) -> None:
        """`accept` the tokens a step sampled for its sampling chunks."""
        kept = [(c.request, tokens) for c, tokens in zip(scheduler_output.chunks, step_output.sampled_token_ids)
                if c.sample]
        self.accept([r for r, _ in kept], [tokens for _, tokens in kept])

    def accept(self, requests: list[Request], sampled: list[list[int]]) -> None:
        """Advance the constrained requests' matchers by the tokens the step kept for them."""
        for request, tokens in zip(requests, sampled):
            if request.sampling_params.grammar is None:
                continue
            state = self.states[request.request_id]
            for token_id in tokens:
                if state.matcher.is_terminated():
                    break  # a stop token inside an accepted run: the request ends there, the rest is dropped
                if not state.advance(token_id):
                    # Only when no token was allowed (e.g. min_tokens masked the grammar's stop tokens).
                    logger.warning("request %s: token %d is outside its grammar", request.request_id, token_id)
                    break

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)



@dataclass(frozen=True, slots=True)
class SerializedGrammar:
    """A compiled grammar on its way to a data-parallel replica (an xgrammar object does not pickle): xgrammar's
    JSON of it, and the vocabulary it was compiled for by number, with its JSON the first time that replica gets
    it (about 50 KB for the embedded model's 2,048 tokens, megabytes for GLM-4.5's 151,552)."""

    grammar_json: str
    vocab_number: int
    vocab_json: str | None  # None: the replica has it already
    start_token_id: int | None
    description: str


class GrammarSender:
    """The data-parallel front's side: numbers each vocabulary (the compiler's, one per server) and sends its JSON
    to each replica once, with the first grammar compiled for it."""

    def __init__(self, num_replicas: int) -> None:
        self._numbers: dict[int, tuple[object, int, str]] = {}  # id(vocabulary): (it, kept alive; number; JSON)
        self._sent: list[set[int]] = [set() for _ in range(num_replicas)]

    def serialize(self, constraint: GrammarConstraint, replica: int) -> SerializedGrammar:
        vocab = constraint.vocabulary
        if vocab is None:  # compiled elsewhere than StructuredOutputCompiler: its vocabulary travels every time
            vocab = constraint.compiled.tokenizer_info
        known = self._numbers.get(id(vocab))
        if known is None:
            known = (vocab, len(self._numbers), vocab.serialize_json())
            if constraint.vocabulary is not None:
                self._numbers[id(vocab)] = known
        _, number, vocab_json = known
        first = number not in self._sent[replica]
        self._sent[replica].add(number)
        return SerializedGrammar(constraint.compiled.serialize_json(), number, vocab_json if first else None,
                                 constraint.start_token_id, constraint.description)


class GrammarReceiver:
    """A replica's side: each vocabulary deserialized once, the grammars against it."""

    def __init__(self) -> None:
        self._vocabs: dict[int, xgr.TokenizerInfo] = {}

    def restore(self, sent: SerializedGrammar) -> GrammarConstraint:
        if sent.vocab_json is not None:
            self._vocabs[sent.vocab_number] = xgr.TokenizerInfo.deserialize_json(sent.vocab_json)
        vocab = self._vocabs[sent.vocab_number]
        return GrammarConstraint(xgr.CompiledGrammar.deserialize_json(sent.grammar_json, vocab), sent.start_token_id,
                                 sent.description, vocab)
