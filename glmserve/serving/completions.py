"""POST /v1/completions: raw prompts (text or token ids, one or several), no template, no parsers.

A text prompt is encoded with added tokens matched and nothing prepended: a GLM prompt writes `[gMASK]<sop>` and
its role tokens itself, as the chat template does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import Request

from glmserve.serving.generation import (
    Generation,
    sampling_params,
    stream_response,
    unless_disconnected,
)
from glmserve.serving.prompt_workers import check_fits
from glmserve.serving.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from glmserve.serving.state import ServerState
from glmserve.serving.structured_output import GrammarSpec


def _prompts(state: ServerState, prompt, max_model_len: int) -> list[list[int]]:
    """The prompts' token ids (run in a prompt worker: tokenizing a long text takes a while)."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    for text in prompt:
        if isinstance(text, str):
            check_fits(text, state.tokenizer, max_model_len, "prompt")
    return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request):
    model = state.model_name(req.model)
    info = state.client.require_info()
    state.limits.check_max_tokens(req.max_tokens, "max_tokens")
    params = sampling_params(req, info, max_tokens=req.max_tokens, logprobs=req.logprobs,
                             skip_special_tokens=req.skip_special_tokens,
                             lora_request=state.lora_request(model, req.lora_path))
    spec = GrammarSpec.from_request(req)
    if spec is not None:
        params = dataclasses.replace(params, grammar=await state.structured_output.compile(spec, info.vocab_size))
    prompts = await state.prompt_workers.run(_prompts, state, req.prompt, info.max_model_len)
    gen = await Generation.start(state, prompts, params, api="completions")
    response_id, created = random_id("cmpl"), int(time.time())
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def usage_chunk() -> str:
            return _sse(CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                           usage=gen.usage()))

        return stream_response(gen, _stream(state, req, gen, response_id, created, model),
                               usage_chunk if include_usage else None)
    return await unless_disconnected(raw, _complete(state, req, gen, response_id, created, model))


async def _complete(state, req: CompletionRequest, gen: Generation, response_id, created, model):
    texts = {c.index: "" for c in gen.choices}
    logprobs = {c.index: [] for c in gen.choices}
    token_ids = {c.index: [] for c in gen.choices}
    try:
        async for d in gen.deltas():
            texts[d.choice.index] += d.text
            logprobs[d.choice.index].extend(d.logprobs or ())
            token_ids[d.choice.index].extend(d.token_ids)
    finally:
        gen.close()
    choices = []
    for c in gen.choices:
        choice = CompletionChoice(
            index=c.index, text=texts[c.index], finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=state.logprobs.completion(logprobs[c.index], 0) if req.logprobs is not None else None)
        if req.return_token_ids:
            choice.prompt_token_ids, choice.token_ids = c.prompt_token_ids, token_ids[c.index]
        choices.append(choice)
    return CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=gen.usage())


def _sse(response: CompletionResponse) -> str:
    return f"data: {response.model_dump_json(exclude_none=True)}\n\n"


async def _stream(state, req: CompletionRequest, gen: Generation, response_id, created,
                  model) -> AsyncIterator[str]:
    continuous_usage = req.stream_options is not None and req.stream_options.continuous_usage_stats
    offsets = {c.index: 0 for c in gen.choices}  # text_offset of the next token, per choice
    unsent_prompt = {c.index for c in gen.choices} if req.return_token_ids else set()
    async for d in gen.deltas():
        if not (d.text or d.logprobs or d.finished or (req.return_token_ids and d.token_ids)):
            continue
        choice = CompletionChoice(index=d.choice.index, text=d.text)
        if req.logprobs is not None:
            choice.logprobs = state.logprobs.completion(d.logprobs or [], offsets[d.choice.index])
            offsets[d.choice.index] += len(d.text)
        if req.return_token_ids:
            choice.token_ids = d.token_ids
            if d.choice.index in unsent_prompt:
                unsent_prompt.discard(d.choice.index)
                choice.prompt_token_ids = d.choice.prompt_token_ids
        if d.finished:
            choice.finish_reason, choice.stop_reason = d.choice.finish_reason, d.choice.stop_reason
        yield _sse(CompletionResponse(id=response_id, created=created, model=model, choices=[choice],
                                      usage=gen.usage() if continuous_usage else None))
