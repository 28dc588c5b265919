"""The one output path from the engine's token ids to text, shared by every API (OpenAI chat and completions,
Anthropic messages, Responses; through `Generation`), the offline `LLM` and `glmserve chat`.

`OutputProcessor` fans a request out into n choices per prompt (choice index = prompt index * n + sample index,
each with its own engine request id and seed), turns each engine output into a `ChoiceDelta` (incremental
detokenization and stop strings, vLLM's semantics, in `TextOutput`), ends a choice at its stop string (the caller
aborts the engine request it names), counts the tokens that are output and writes the usage. The checkpoint's
generation_config.json sampling defaults are applied by `default_sampling`, the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from glmserve.config import GenerationDefaults
from glmserve.serving.protocol import UsageInfo
from glmserve.serving.text_output import TextOutput
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import EngineOutput, SamplingParams, TokenLogprobs


def default_sampling(defaults: GenerationDefaults, temperature: float | None = None, top_p: float | None = None,
                     top_k: int | None = None) -> dict:
    """temperature, top_p and top_k: the given value, else generation_config.json's, else vLLM's neutral one (as
    vLLM applies a checkpoint's defaults)."""

    def pick(value, default, fallback):
        return value if value is not None else default if default is not None else fallback

    return {"temperature": pick(temperature, defaults.temperature, 1.0), "top_p": pick(top_p, defaults.top_p, 1.0),
            "top_k": pick(top_k, defaults.top_k, 0)}


@dataclass(slots=True, eq=False)
class Choice:
    index: int
    request_id: str  # the engine request's
    prompt_token_ids: list[int]
    text: TextOutput
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class ChoiceDelta:
    choice: Choice
    text: str
    token_ids: list[int]  # the new tokens up to the one completing a stop string (which is cut from text only)
    token_logprobs: list[TokenLogprobs] | None  # one per token id
    abort: bool = False  # a stop string ended the choice before the engine did: abort its engine request
    ends_with_stop_token: bool = False  # the last token id is the stop token, which is not in the text

    @property
    def finished(self) -> bool:
        return self.choice.finish_reason is not None

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """The logprobs the APIs show: not the stop token's, which is no part of the text (vLLM's servers)."""
        lps = self.token_logprobs
        return lps[:-1] if lps and self.ends_with_stop_token else lps


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, prompts: Sequence[list[int]], params: SamplingParams, request_id: str):
        self.params = params
        self.choices: list[Choice] = []
        self.sample_params: list[SamplingParams] = []  # per choice: one sequence, its own seed
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                child = params.for_sample(j)
                index = p * params.n + j
                self.choices.append(Choice(index, f"{request_id}-{index}", prompt, TextOutput(tokenizer, child)))
                self.sample_params.append(child)
        self._by_id = {c.request_id: c for c in self.choices}

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def process(self, out: EngineOutput) -> ChoiceDelta | None:
        """One engine output of one choice; None for a step the engine ran after the choice had ended (a stop
        string's abort had not reached it yet: those tokens are not output)."""
        choice = self._by_id[out.request_id]
        if choice.finish_reason is not None:
            return None
        choice.num_cached_tokens = out.num_cached_tokens
        stopped_by_token = out.finished and out.finish_reason == "stop"
        text = choice.text.update(out.new_token_ids, out.finished, stopped_by_token)
        used = choice.text.tokens_used  # fewer than the step's tokens when a stop string ended the output
        choice.num_output_tokens += used
        logprobs = out.new_logprobs[:used] if out.new_logprobs else out.new_logprobs
        abort = False
        if choice.text.stop_string is not None:
            choice.finish_reason, choice.stop_reason = "stop", choice.text.stop_string
            abort = not out.finished
        elif out.finished:
            choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
        hidden_stop_token = (stopped_by_token and not self.params.include_stop_str_in_output
                             and used == len(out.new_token_ids))
        return ChoiceDelta(choice, text, out.new_token_ids[:used], logprobs, abort, hidden_stop_token)

    def usage(self) -> UsageInfo:
        prompts = {c.index // self.params.n: c for c in self.choices}.values()  # one choice per prompt
        prompt_tokens = sum(c.num_prompt_tokens for c in prompts)
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details={"cached_tokens": sum(c.num_cached_tokens for c in prompts)})
