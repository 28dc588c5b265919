"""LLMEngine: requests in, token ids out, one `step()` at a time. Speaks token ids only."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from glmserve.config import ConfigError, EngineConfig, GenerationDefaults, ModelConfig
from glmserve.engine.kv_cache import KVCacheManager
from glmserve.engine.lora_registry import LoRARegistry
from glmserve.engine.model_runner import ModelRunner
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.tensor_parallel import TensorParallelRunner
from glmserve.layers.attention.huge_pages import wait_until_backed
from glmserve.types import (
    AdapterError,
    EngineOutput,
    LoRARequest,
    ParamError,
    Request,
    SamplingParams,
)

logger = logging.getLogger(__name__)


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise ParamError for a request no engine could take (also checked by the data-parallel front, before it
    picks a replica: engine/data_parallel.py)."""
    if not prompt_token_ids:
        raise ParamError("The prompt must contain at least one token.", "prompt")
    if any(t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise ParamError(f"Prompt token ids must be in [0, {vocab_size}).", "prompt")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise ParamError(f"stop_token_ids must be in [0, {vocab_size}).", "stop_token_ids")
    if len(prompt_token_ids) >= max_model_len:
        raise ParamError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{len(prompt_token_ids)} input tokens, which leaves no room for output.", "prompt")


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True, wait_for_kv_memory: bool = True):
        """wait_for_kv_memory=False (the server): return while the CPU KV pool is still being backed by memory
        in the background (layers/attention/huge_pages.py)."""
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.generation_defaults = GenerationDefaults.from_pretrained(config.model)
        self.eos_token_ids = frozenset(self.generation_defaults.eos_token_ids or self.model_config.eos_token_ids)
        positions = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > positions:
            raise ConfigError(f"--max-model-len {config.max_model_len} exceeds the model's "
                              f"max_position_embeddings ({positions})")
        # Tensor / pipeline parallel: this process is rank 0 and starts (or meets) the others, which step in
        # lockstep with it.
        parallel = config.tensor_parallel_size * config.pipeline_parallel_size > 1
        self.runner = (TensorParallelRunner(self.model_config, config, progress) if parallel
                       else ModelRunner(self.model_config, config, progress=progress))
        if wait_for_kv_memory:
            wait_until_backed()
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_spec = self.runner.kv_spec
        self.max_model_len = self._max_model_len(positions)
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   long_prefill_token_threshold=config.long_prefill_token_threshold,
                                   num_speculative_tokens=config.num_speculative_tokens,
                                   max_loras=config.max_loras if config.enable_lora else 0)
        self.loras = LoRARegistry(getattr(self.runner, "lora", None))  # (None: LoRA off, or tensor parallel)
        for name, path in config.lora_modules:
            try:
                self.loras.add(name, path)
            except AdapterError as e:
                raise ConfigError(f"--lora-modules {name}={path}: {e}") from None
        # Structured output's matchers (engine/grammar.py), beside the scheduler as in vLLM: one per constrained
        # request, made as it arrives (the manager with the first). With several ranks only this one (rank 0) holds
        # them; the step carries the bitmask.
        self.structured_output = None

    def _max_model_len(self, positions: int) -> int:
        """--max-model-len, or what the model and the KV pool allow. One sequence must always fit in the pool, or
        preemption could never make room for it."""
        config, spec = self.config, self.kv_spec
        capacity = self.kv_cache.capacity_tokens - max(config.num_speculative_tokens - 1, 0)  # drafter lookahead
        wanted = config.max_model_len or positions
        if wanted <= capacity:
            return wanted
        needed_mib = wanted * spec.bytes_per_token / 2**20
        smaller = "" if spec.dtype.startswith("float8") else "use --kv-cache-dtype fp8, "
        advice = (f"one request of {wanted} tokens needs {needed_mib:.1f} MiB of KV cache at {spec.dtype} "
                  f"({spec.bytes_per_token} bytes per token) and the pool holds {capacity} tokens: raise "
                  f"--kv-cache-memory-gb (or --gpu-memory-utilization), {smaller}or lower "
                  f"--max-model-len")
        if config.max_model_len is not None:
            raise ConfigError(f"--max-model-len {config.max_model_len} does not fit in the KV cache: {advice}")
        logger.warning("max_model_len %d instead of the model's %d: %s", capacity, positions, advice)
        return capacity

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; invalid input raises ParamError before it reaches the scheduler."""
        check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        self.loras.check(params.lora_request)
        request = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len)
        self.scheduler.add_request(request)
        if params.grammar is not None:
            if self.structured_output is None:
                # Imported here: xgrammar (and the transformers it imports) loads only once a request needs it.
                from glmserve.engine.grammar import StructuredOutputManager
                self.structured_output = StructuredOutputManager()
            self.structured_output.add(request)
        return request

    def add_lora(self, name: str, path: str) -> LoRARequest:
        """Load an adapter (vLLM's /v1/load_lora_adapter). Raises AdapterError for a bad one."""
        return self.loras.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused (LoRAInUseError) while unfinished requests use it."""
        self.loras.remove(name, self.scheduler.requests.values())

    def abort(self, request_ids: Iterable[str]) -> None:
        for request in self.scheduler.abort_requests(list(request_ids)):
            self._release(request.request_id)

    def _release(self, request_id: str) -> None:
        self.runner.release(request_id)
        if self.structured_output is not None:
            self.structured_output.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def keep_alive_interval(self) -> float | None:
        """Tensor parallel: how often an idle engine must call `keep_alive` (None: never)."""
        return self.runner.keep_alive_interval if isinstance(self.runner, TensorParallelRunner) else None

    def keep_alive(self) -> None:
        """Tensor parallel: a round trip through the ranks; raises if one is dead or hung (see tensor_parallel)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.keep_alive()

    def close(self) -> None:
        """Stop a tensor-parallel engine's other processes (nothing to do with one process)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def step(self) -> list[EngineOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        grammars = self.structured_output if self.structured_output and self.structured_output.states else None
        if grammars is not None:
            scheduler_output.grammar_bitmask = grammars.step_bitmask(scheduler_output, self.model_config.vocab_size)
        step_output = self.runner.execute(scheduler_output)
        if grammars is not None:
            grammars.accept_step(scheduler_output, step_output)
        outputs = self.scheduler.update_from_output(scheduler_output, step_output)
        for out in outputs:
            if out.finished:
                self._release(out.request_id)
        return outputs
