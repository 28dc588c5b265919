"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, for Claude Code and the `anthropic` SDK.

A request is turned into the chat request it means and served by the chat path: the prompt is token for token the
one the same conversation sent to /v1/chat/completions renders (tested), with the same parsers and sampling
defaults; the output comes back as Anthropic's content blocks (glmserve.serving.output_blocks), streamed as its
event sequence (message_start, ping, content_block_start/delta/stop, message_delta, message_stop).

Choices, vLLM's where it has one:

* `thinking` absent leaves GLM-4.5's thinking on, as on chat (the model's default); `enabled` and `adaptive` turn
  it on, `disabled` off. Reasoning comes back as `thinking` blocks with an empty `signature` (nothing is signed;
  signatures sent back are ignored).
* `tool_choice`: `auto`, `any` (chat's "required"), `tool` (a named function), `none` (tools left out of the
  prompt); `disable_parallel_tool_use` keeps the first `tool_use` block.
* `stop_reason`: `max_tokens` when the output hit it, `stop_sequence` (with `stop_sequence`) for a stop sequence,
  `tool_use` when the output holds a call, else `end_turn`.
* `usage.input_tokens` is the whole prompt (the prefix cache's hits are not split out).
* A last message from the assistant (prefill) is refused: GLM-4.5's template closes every assistant turn.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from glmserve.serving.anthropic_protocol import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
)
from glmserve.serving.chat import ChatPrompt, request_grammar
from glmserve.serving.errors import anthropic_error_body, describe
from glmserve.serving.generation import (
    Generation,
    sampling_params,
    stream_response,
    unless_disconnected,
)
from glmserve.serving.output_blocks import (
    Block,
    BlockAssembler,
    BlockEvent,
    stream_block_events,
    whole_blocks,
)
from glmserve.serving.protocol import ChatCompletionRequest
from glmserve.serving.state import ServerState
from glmserve.types import ParamError

_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat completion request an Anthropic request means. Raises ParamError."""
    if req.messages[-1].role == "assistant":
        raise ParamError("the last message must be the user's: continuing an assistant message (prefill) is not "
                         "supported", "messages")
    body: dict = {"model": req.model, "messages": _chat_messages(req)}
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description is not None else {}),
            "parameters": t.input_schema}} for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = _TOOL_CHOICES.get(choice.type) or {"type": "function", "function": {"name": choice.name}}
    if req.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stop=req.stop_sequences, temperature=req.temperature,
                    top_p=req.top_p, top_k=req.top_k, stream=req.stream,
                    user=req.metadata.user_id if req.metadata else None)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        raise ParamError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}", "messages") from None


def _text_parts(blocks: list[TextBlock]) -> list[dict]:
    return [{"type": "text", "text": b.text} for b in blocks]


def _chat_messages(req: CountTokensRequest) -> list[dict]:
    """Anthropic's system and messages as OpenAI chat messages: a tool_result block becomes a tool message, an
    assistant turn's thinking its reasoning_content and its tool_use blocks its tool_calls."""
    messages = []
    if req.system is not None:
        messages.append({"role": "system",
                         "content": req.system if isinstance(req.system, str) else _text_parts(req.system)})
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            messages.append(_assistant_message(m.content))
        else:
            texts = []
            for block in m.content:
                if block.type == "text":
                    texts.append(block)
                    continue
                if texts:
                    messages.append({"role": "user", "content": _text_parts(texts)})
                    texts = []
                content = block.content if isinstance(block.content, str) else _text_parts(block.content)
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
            if texts:
                messages.append({"role": "user", "content": _text_parts(texts)})
    return messages


def _assistant_message(blocks) -> dict:
    message = {"role": "assistant", "content": "".join(b.text for b in blocks if b.type == "text")}
    reasoning = "".join(b.thinking for b in blocks if b.type == "thinking")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if b.type == "tool_use"]
    if calls:
        message["tool_calls"] = calls
    return message


async def count_tokens(state: ServerState, req: CountTokensRequest) -> JSONResponse:
    state.model_name(req.model)
    state.client.require_info()
    prompt = await state.prompt_workers.run(ChatPrompt, state, chat_request(req))
    return JSONResponse({"input_tokens": len(prompt.token_ids)})


async def create_message(state: ServerState, req: MessagesRequest, raw: Request):
    model = state.model_name(req.model)
    info = state.client.require_info()
    state.limits.check_max_tokens(req.max_tokens, "max_tokens")
    chat = chat_request(req)
    prompt = await state.prompt_workers.run(ChatPrompt, state, chat)
    params = sampling_params(chat, info, max_tokens=req.max_tokens, logprobs=None,
                             skip_special_tokens=not prompt.needs_special_tokens(state),
                             lora_request=state.lora_request(model))
    params = dataclasses.replace(params, grammar=await request_grammar(state, chat, prompt, info.vocab_size))
    gen = await Generation.start(state, [prompt.token_ids], params, api="anthropic")
    single_call = req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use
    assembler = BlockAssembler(prompt.stream_parser(), max_tool_calls=1 if single_call else None)
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model}
    if req.stream:
        return stream_response(gen, _stream(gen, assembler, message), None, done="", error_event=_sse_error)
    return await unless_disconnected(raw, _complete(gen, assembler, message))


async def _complete(gen: Generation, assembler: BlockAssembler, message: dict) -> JSONResponse:
    text = ""
    try:
        async for d in gen.deltas():
            text += d.text
    finally:
        gen.close()
    blocks = whole_blocks(assembler, text)
    stop_reason, stop_sequence = _stop_reason(gen, assembler.num_tool_calls)
    usage = gen.usage()
    return JSONResponse({**message, "content": [_content_block(b) for b in blocks], "stop_reason": stop_reason,
                         "stop_sequence": stop_sequence, "stop_details": None,
                         "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}})


def _stop_reason(gen: Generation, num_tool_calls: int) -> tuple[str, str | None]:
    (choice,) = gen.choices
    if choice.finish_reason == "length":
        return "max_tokens", None
    if isinstance(choice.stop_reason, str):  # a stop string; a stop token's reason is its id
        return "stop_sequence", choice.stop_reason
    return ("tool_use" if num_tool_calls else "end_turn"), None


def _tool_use_id(call: dict) -> str:
    return "toolu_" + call["id"].removeprefix("call_")


def _content_block(block: Block) -> dict:
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": block.text, "signature": ""}
    if block.kind == "text":
        return {"type": "text", "text": block.text}
    function = block.call["function"]
    return {"type": "tool_use", "id": _tool_use_id(block.call), "name": function["name"],
            "input": json.loads(function["arguments"])}


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


def _sse_error(error: Exception) -> str:
    status, message, _, _ = describe(error)
    return f"event: error\ndata: {json.dumps(anthropic_error_body(status, message), ensure_ascii=False)}\n\n"


_EMPTY_BLOCKS = {"reasoning": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""}}
_DELTAS = {"reasoning": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}


def block_event_sse(e: BlockEvent) -> list[str]:
    """A block event as Anthropic's stream events."""
    if e.type == "stop":
        return [_event("content_block_stop", {"index": e.index})]
    if e.block.kind == "tool_call":  # a call's block starts whole: its input in one delta
        block = _content_block(e.block)
        return [_event("content_block_start", {"index": e.index, "content_block": {**block, "input": {}}}),
                _event("content_block_delta", {"index": e.index, "delta": {
                    "type": "input_json_delta", "partial_json": e.block.call["function"]["arguments"]}})]
    if e.type == "start":
        return [_event("content_block_start", {"index": e.index, "content_block": _EMPTY_BLOCKS[e.block.kind]})]
    kind, field = _DELTAS[e.block.kind]
    return [_event("content_block_delta", {"index": e.index, "delta": {"type": kind, field: e.text}})]


async def _stream(gen: Generation, assembler: BlockAssembler, message: dict) -> AsyncIterator[str]:
    yield _event("message_start", {"message": {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {"input_tokens": gen.choices[0].num_prompt_tokens,
                                                         "output_tokens": 0}}})
    yield _event("ping", {})
    async for e in stream_block_events(assembler, gen):
        for sse in block_event_sse(e):
            yield sse
    stop_reason, stop_sequence = _stop_reason(gen, assembler.num_tool_calls)
    yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence,
                                             "stop_details": None},
                                   "usage": {"output_tokens": gen.usage().completion_tokens}})
    yield _event("message_stop", {})
