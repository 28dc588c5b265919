"""The offline API, shaped like vLLM's: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from glmserve.config import EngineConfig, num_speculative_tokens
from glmserve.engine.llm_engine import LLMEngine
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.output_processor import OutputProcessor, default_sampling
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import LoRARequest, SamplingParams, TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(self, model: str | Path | None = None, *, progress: bool = False,
                 speculative_config: dict | None = None, **engine_args):
        """model: a checkpoint directory (default: the embedded glm-4.5-nano); engine_args: EngineConfig fields;
        speculative_config as vLLM's, e.g. {"method": "mtp", "num_speculative_tokens": 3}."""
        model = EMBEDDED_MODEL if model is None else model
        if speculative_config is not None:
            engine_args["num_speculative_tokens"] = num_speculative_tokens(speculative_config)
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args), progress=progress)
        self.tokenizer = Tokenizer(model)
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """generation_config.json's sampling defaults (temperature, top_p, top_k), as the server applies them to a
        request that sets none; what `generate` uses without sampling_params (vLLM's method)."""
        return SamplingParams(**default_sampling(self.engine.generation_defaults))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or vLLM's `{"prompt_token_ids": [...]}` dicts (or a list of them).
        Returns one RequestOutput per prompt, in order. Without sampling_params, the checkpoint's defaults.
        lora_request (LLM(enable_lora=True)): the adapter of every prompt, or one per prompt; an adapter not yet
        loaded is loaded under its name (its lora_int_id is the engine's own)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(params_list) != len(prompts) or len(loras) != len(prompts):
            raise ValueError("sampling_params and lora_request must be one for all or one per prompt")
        params_list = [p if lora is None else dataclasses.replace(p, lora_request=self._lora(lora))
                       for p, lora in zip(params_list, loras)]

        results: list[RequestOutput] = []
        requests: dict[str, tuple[OutputProcessor, RequestOutput]] = {}  # by engine request id
        for prompt, p in zip(prompts, params_list):
            text, ids = self._prompt_ids(prompt)
            request_id = str(next(self._ids))
            outputs = OutputProcessor(self.tokenizer, [ids], p, request_id)
            result = RequestOutput(request_id, text, ids,
                                   [CompletionOutput(c.index, logprobs=[] if p.logprobs is not None else None)
                                    for c in outputs.choices])
            results.append(result)
            for choice, child in zip(outputs.choices, outputs.sample_params):
                self.engine.add_request(choice.request_id, ids, child)
                requests[choice.request_id] = (outputs, result)

        bar = tqdm(total=len(requests), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for step in self.engine.step():
                outputs, result = requests[step.request_id]
                result.num_cached_tokens = max(result.num_cached_tokens, step.num_cached_tokens)
                if self._apply(outputs, step, result):
                    bar.update()
        bar.close()
        return results

    def _lora(self, lora: LoRARequest) -> LoRARequest:
        loaded = self.engine.loras.adapters.get(lora.lora_name)
        if loaded is None:
            return self.engine.add_lora(lora.lora_name, lora.lora_path)
        if loaded.lora_path != str(lora.lora_path):
            raise ValueError(f"an adapter named {lora.lora_name!r} is loaded from {loaded.lora_path}")
        return loaded

    def _apply(self, outputs: OutputProcessor, step, result: RequestOutput) -> bool:
        """One engine step of one sample into its CompletionOutput; True when the sample has just finished."""
        delta = outputs.process(step)
        if delta is None:
            return False
        completion = result.outputs[delta.choice.index]
        completion.text += delta.text
        completion.token_ids.extend(delta.token_ids)
        if completion.logprobs is not None and delta.token_logprobs:
            completion.logprobs.extend(delta.token_logprobs)
        if delta.abort:
            self.engine.abort([step.request_id])
        if delta.finished:
            completion.finish_reason, completion.stop_reason = delta.choice.finish_reason, delta.choice.stop_reason
        return delta.finished

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        return prompt, self.tokenizer.encode(prompt)
