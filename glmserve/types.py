"""Plain data shared by the engine layers: sampling parameters, request state, scheduler and step outputs.

No torch, no text: the engine speaks token ids. Request state is counters, not phase flags: a request has
`num_computed_tokens` of its `token_ids` in the KV cache; prefill, chunked prefill and decode are the same thing
seen at different counter values.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


class ParamError(ValueError):
    """An invalid request parameter; `param` names the offending field (OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served (missing or malformed, unsupported, too large a rank, a target module
    the model lacks): the message says what is wrong and where."""


class LoRAInUseError(ValueError):
    """An adapter that running or waiting requests use cannot be unloaded."""


class LoRANotFoundError(ValueError):
    """No adapter of that name is loaded."""


@dataclass(frozen=True, slots=True, eq=False)
class GrammarConstraint:
    """A compiled grammar that a request's output is held to: serving/structured_output.py compiles it (off the
    engine's step), engine/grammar.py matches it token by token and masks the logits of the constrained rows."""

    compiled: Any  # an xgrammar CompiledGrammar (only engine/grammar.py looks inside)
    # With thinking on, the constraint starts once this token (`</think>`) has been generated: reasoning is free.
    start_token_id: int | None = None
    description: str = ""  # what it was compiled from, for logs (e.g. "json_schema", "tool_calls(required)")
    # The xgrammar TokenizerInfo it was compiled for (the compiler's: one per server), so that a data-parallel
    # front sends it to each replica once.
    vocabulary: Any = None

    def __reduce__(self):
        # Pickled without the compiled grammar (an xgrammar object, which does not pickle): tensor- and pipeline-
        # parallel ranks get each step's requests pickled, but only rank 0's engine matches grammars and sends them
        # the step's bitmask. A data-parallel replica gets the grammar serialized (engine/grammar.py).
        return GrammarConstraint, (None, self.start_token_id, self.description)


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """A LoRA adapter a request runs with (vLLM's name). lora_int_id is unique per load of an adapter (it salts
    the prefix-cache hash, so an adapter reloaded under the same name never reuses the old one's blocks)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass(slots=True)
class SamplingParams:
    """vLLM's field names and defaults. Validated once, at construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: GrammarConstraint | None = None  # structured output: a constraint on the output tokens
    lora_request: LoRARequest | None = None  # the adapter the request runs with; None: the base model

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of parallel sample `index` of n: one sequence, and a distinct seed derived from the
        request's, as vLLM derives them."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "n must be at least 1"),
            (self.temperature >= 0.0, "temperature", "temperature must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "top_k must be -1 (disable), 0 (disable) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "repetition_penalty must be greater than 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "min_tokens must be less than or equal to max_tokens",
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "logprobs must be non-negative"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop_token_ids must be non-negative"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise ParamError(f"{message}, got {getattr(self, param)!r}.", param)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated. `token_ids` holds the prompt followed by the output so far."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None  # hard cap on prompt + output
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule (-1: not scheduled yet)
    block_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)  # speculative proposals to verify next step
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, computed once and reused (KVCacheManager owns the meaning).
    block_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ParamError("The prompt must contain at least one token.", "prompt")
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


@dataclass(slots=True)
class ScheduledChunk:
    """The part of one request computed in a step: positions [start_pos, start_pos + len(token_ids))."""

    request: Request
    token_ids: list[int]
    start_pos: int
    # True when this chunk reaches the end of the request's known tokens, so the step samples its next token.
    sample: bool
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + len(self.draft_token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner computes this step. Torch-free, built by `Scheduler.schedule()`."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Structured output: (int32 token bitmask, rows it constrains) over the step's sampled rows, filled by the
    # engine's grammar matchers (engine/grammar.py); the runner on every rank that samples applies it.
    grammar_bitmask: Any = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of the sampled token and the top-N alternatives at one position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first


@dataclass(slots=True)
class StepOutput:
    """The runner's answer for one step: for each chunk (same order), the accepted new tokens (empty when the
    chunk did not sample), when asked for their logprobs, and with speculative decoding the drafts to verify
    next step."""

    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None] | None = None
    draft_token_ids: list[list[int]] | None = None


@dataclass(slots=True)
class EngineOutput:
    """What the engine reports for one request after a step: the new tokens and whether it has finished (token ids
    only; `glmserve.llm.RequestOutput` is the offline API's whole result, text included)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
