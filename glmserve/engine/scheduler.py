"""One scheduler for prefill, chunked prefill, decode and draft verification (vLLM v1 style).

A request is just `num_computed_tokens` behind `num_tokens` (plus any draft tokens to verify); each step gives
every scheduled request a chunk of the tokens it has not computed yet, within a token budget. Running requests
go first; when the KV cache runs out, the most recently admitted one is preempted and later recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from glmserve.engine.kv_cache import KVCacheManager
from glmserve.engine.stop import check_stop
from glmserve.types import (
    EngineOutput,
    Request,
    RequestStatus,
    ScheduledChunk,
    SchedulerOutput,
    StepOutput,
)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    spec_decoding: SpecDecodingStats | None = None  # with speculative decoding only


@dataclass(slots=True)
class SpecDecodingStats:
    """vLLM's speculative-decoding counters; mean acceptance length = 1 + accepted / drafts."""

    num_drafts: int = 0  # verification runs (requests x steps that had drafts)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        missing = num_draft_tokens - len(self.accepted_per_position)
        if missing > 0:
            self.accepted_per_position.extend([0] * missing)
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.accepted_per_position))


def _max_num_tokens(request: Request) -> int | None:
    """The most tokens (prompt + output) the request can ever hold, or None when unbounded."""
    bounds = []
    if request.sampling_params.max_tokens is not None:
        bounds.append(request.num_prompt_tokens + request.sampling_params.max_tokens)
    if request.max_model_len is not None:
        bounds.append(request.max_model_len)
    return min(bounds) if bounds else None


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        long_prefill_token_threshold: int = 0,
        num_speculative_tokens: int = 0,
        max_loras: int = 0,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or long_prefill_token_threshold < 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, the threshold >= 0")
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_loras = max_loras  # distinct LoRA adapters in one step (0: LoRA off)
        # Slots reserved past each chunk for the drafter's chained steps: k MTP drafts write k - 1 positions
        # beyond the last kept token.
        self.num_lookahead_tokens = max(num_speculative_tokens - 1, 0)
        self.spec_decoding = SpecDecodingStats() if num_speculative_tokens else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; preemption takes from the end
        self.requests: dict[str, Request] = {}  # unfinished requests by id

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        max_len = _max_num_tokens(request)
        # A request that cannot fit in the whole cache would preempt itself forever.
        if max_len is not None and max_len + self.num_lookahead_tokens > self.kv_cache.capacity_tokens:
            raise ValueError(
                f"request {request.request_id!r} may reach {max_len} tokens, more than the KV cache holds "
                f"({self.kv_cache.capacity_tokens})"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the named unfinished requests as aborted and free their blocks; unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self.kv_cache.free(request)
            request.status = RequestStatus.FINISHED_ABORTED
            aborted.append(request)
        return aborted

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache
        spec = self.spec_decoding.snapshot() if self.spec_decoding is not None else None
        return SchedulerStats(
            self.num_running, self.num_waiting, kv.usage, kv.prefix_cache_queries, kv.prefix_cache_hits, spec
        )

    # ---- scheduling --------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        loras: set[int] = set()  # the step's adapters

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if not self._lora_fits(request, loras):  # it waits, with its blocks, for a step with room
                i += 1
                continue
            self._cap_drafts(request)
            num_new = self._num_new_tokens(
                request.num_tokens + len(request.draft_token_ids) - request.num_computed_tokens, budget
            )
            while not self.kv_cache.allocate_slots(request, num_new + self.num_lookahead_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                output.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            else:  # allocated without preempting this request
                self._add_lora(request, loras)
                output.chunks.append(self._make_chunk(request, num_new))
                budget -= num_new
                i += 1

        # Admitting while preempting would only thrash: the freed blocks are for the running requests.
        if output.preempted_request_ids:
            return output
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self._lora_fits(request, loras):
                break
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new + self.num_lookahead_tokens, computed_blocks):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_lora(request, loras)
            output.chunks.append(self._make_chunk(request, num_new))
            budget -= num_new
        return output

    def _lora_fits(self, request: Request, loras: set[int]) -> bool:
        """Whether the request's adapter is in the step already or there is room for one more (--max-loras)."""
        lora = request.sampling_params.lora_request
        return lora is None or lora.lora_int_id in loras or len(loras) < self.max_loras

    @staticmethod
    def _add_lora(request: Request, loras: set[int]) -> None:
        if request.sampling_params.lora_request is not None:
            loras.add(request.sampling_params.lora_request.lora_int_id)

    def _num_new_tokens(self, num_remaining: int, budget: int) -> int:
        num_new = min(num_remaining, budget)
        if self.long_prefill_token_threshold:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return num_new

    def _cap_drafts(self, request: Request) -> None:
        """Drop draft tokens whose KV would run past the request's length cap; they could never be kept."""
        max_len = _max_num_tokens(request)
        if max_len is not None and request.num_tokens + len(request.draft_token_ids) > max_len:
            del request.draft_token_ids[max(max_len - request.num_tokens, 0) :]

    @staticmethod
    def _make_chunk(request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        num_known = min(num_new, request.num_tokens - start)
        return ScheduledChunk(
            request=request,
            token_ids=request.token_ids[start : start + num_known],
            start_pos=start,
            sample=start + num_known == request.num_tokens,
            draft_token_ids=request.draft_token_ids[: num_new - num_known],
        )

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop its KV; it re-enters at the head of the queue."""
        self.kv_cache.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.draft_token_ids = []
        self.waiting.appendleft(request)

    # ---- results -----------------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput, step_output: StepOutput) -> list[EngineOutput]:
        """Advance each scheduled request by its chunk and sampled tokens; finish and free stopped ones.

        For a chunk with drafts, sampled holds the accepted drafts then one more token, so len(sampled) - 1
        drafts were accepted; the slots of the rejected ones are rolled back. The step's drafts, if any,
        replace the verified ones.
        """
        outputs = []
        finished = False
        num_chunks = len(scheduler_output.chunks)
        logprobs = step_output.logprobs or [None] * num_chunks
        next_drafts = step_output.draft_token_ids or [[] for _ in range(num_chunks)]
        for chunk, sampled, chunk_logprobs, drafts in zip(scheduler_output.chunks, step_output.sampled_token_ids,
                                                          logprobs, next_drafts):
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:  # aborted since schedule()
                continue
            num_accepted = max(len(sampled) - 1, 0) if chunk.draft_token_ids else 0
            if chunk.draft_token_ids and self.spec_decoding is not None:
                self.spec_decoding.record(len(chunk.draft_token_ids), num_accepted)
            request.num_computed_tokens += len(chunk.token_ids) + num_accepted
            request.draft_token_ids = list(drafts)

            new_token_ids = []
            status = None
            for token_id in sampled:
                request.append_output_token(token_id)
                new_token_ids.append(token_id)
                status = check_stop(request, token_id)
                if status is not None:
                    break  # the rest of an accepted run is dropped
            # A stop inside an accepted run leaves computed KV past the kept tokens.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
            if status is None and len(chunk.draft_token_ids) > num_accepted:
                self.kv_cache.truncate(request, request.num_computed_tokens)
            self.kv_cache.cache_full_blocks(request, request.num_computed_tokens)

            if status is not None:
                request.status = status
                self.kv_cache.free(request)
                del self.requests[request.request_id]
                finished = True
            if new_token_ids or status is not None:
                outputs.append(
                    EngineOutput(
                        request_id=request.request_id,
                        new_token_ids=new_token_ids,
                        finished=status is not None,
                        finish_reason=status.value if status is not None else None,
                        stop_reason=request.stop_reason,
                        new_logprobs=chunk_logprobs[: len(new_token_ids)] if chunk_logprobs is not None else None,
                        num_prompt_tokens=request.num_prompt_tokens,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                    )
                )
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs
