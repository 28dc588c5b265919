"""The offline API, shaped like vLLM's: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from glmserve.config import EngineConfig, num_speculative_tokens
from glmserve.engine.llm_engine import LLMEngine
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.text_output import TextOutput
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import SamplingParams, TokenLogprobs


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

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or vLLM's `{"prompt_token_ids": [...]}` dicts (or a list of them).
        Returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")

        results: list[RequestOutput] = []
        children: dict[str, tuple[RequestOutput, CompletionOutput, TextOutput]] = {}
        for prompt, p in zip(prompts, params_list):
            text, ids = self._prompt_ids(prompt)
            out = RequestOutput(str(next(self._ids)), text, ids, [])
            results.append(out)
            for index in range(p.n):
                child = p.for_sample(index)
                child_id = f"{out.request_id}-{index}"
                self.engine.add_request(child_id, ids, child)
                completion = CompletionOutput(index, logprobs=[] if p.logprobs is not None else None)
                out.outputs.append(completion)
                children[child_id] = (out, completion, TextOutput(self.tokenizer, child))

        bar = tqdm(total=len(children), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for step in self.engine.step():
                parent, completion, text = children[step.request_id]
                parent.num_cached_tokens = max(parent.num_cached_tokens, step.num_cached_tokens)
                self._apply(step, completion, text)
                if completion.finish_reason is not None:
                    bar.update()
        bar.close()
        return results

    def _apply(self, step, completion: CompletionOutput, text: TextOutput) -> None:
        if completion.finish_reason is not None:
            return
        stopped_by_token = step.finished and step.finish_reason == "stop"
        completion.text += text.update(step.new_token_ids, step.finished, stopped_by_token)
        # A step's tokens after the one completing a stop string (an MTP step emits several) are not output.
        completion.token_ids.extend(step.new_token_ids[: text.tokens_used])
        if completion.logprobs is not None and step.new_logprobs:
            completion.logprobs.extend(step.new_logprobs[: text.tokens_used])
        if text.stop_string is not None:
            completion.finish_reason, completion.stop_reason = "stop", text.stop_string
            if not step.finished:
                self.engine.abort([step.request_id])
        elif step.finished:
            completion.finish_reason, completion.stop_reason = step.finish_reason, step.stop_reason

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        return prompt, self.tokenizer.encode(prompt)
