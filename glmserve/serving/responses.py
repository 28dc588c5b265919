"""POST /v1/responses: OpenAI's Responses API (the newer `openai` SDK's `client.responses`, agent frameworks).

As /v1/messages does, a request is turned into the chat request it means and served by the chat path (the same
prompt token ids as the same conversation sent to /v1/chat/completions, tested); the output blocks
(glmserve.serving.output_blocks) become output items: a `reasoning` item carrying the thinking as `reasoning_text`
content, `message` items with `output_text`, `function_call` items. Streamed, they arrive as the API's semantic
events (response.created, response.in_progress, output_item.added/done, content_part.added/done, reasoning_text,
output_text and function_call_arguments deltas and dones, then response.completed or response.incomplete), each
with its sequence_number. Errors keep OpenAI's shape (after the stream has started: an `error` event).

Choices, vLLM's where it has one: stateless (the response says `store: false`; `previous_response_id` is a 400);
`reasoning.effort: "none"` turns thinking off, any other effort leaves it on (GLM-4.5 has one thinking mode);
`parallel_tool_calls: false` keeps the first call; a response cut by max_output_tokens is `incomplete`;
`usage.output_tokens_details.reasoning_tokens` counts the reasoning's text re-encoded (the model's tokens are not
split by the parser).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from glmserve.serving.chat import ChatPrompt, request_grammar
from glmserve.serving.errors import describe
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
from glmserve.serving.responses_protocol import NamedFunctionChoice, ResponsesRequest
from glmserve.serving.state import ServerState
from glmserve.types import ParamError


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request means. Raises ParamError."""
    body: dict = {"model": req.model, "messages": _chat_messages(req), "max_tokens": req.max_output_tokens,
                  "temperature": req.temperature, "top_p": req.top_p, "user": req.user}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_unset=True)}
                         for t in req.tools]
    if isinstance(req.tool_choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        raise ParamError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}", "input") from None


def _parts(content: str | list[dict]) -> str | list[dict]:
    return content if isinstance(content, str) else [{"type": "text", "text": p["text"]} for p in content]


def _chat_messages(req: ResponsesRequest) -> list[dict]:
    """Input items as chat messages. The assistant's items between two other turns (its reasoning, messages and
    function calls) make one assistant message, as the model wrote them in one turn."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    assistant: dict | None = None  # the assistant message being built
    for item in (i.model_dump() for i in req.input):
        kind = item["type"]
        if kind in ("reasoning", "function_call") or item.get("role") == "assistant":
            if assistant is None:
                assistant = {"role": "assistant", "content": ""}
                messages.append(assistant)
            if kind == "reasoning":
                text = "".join(part["text"] for part in item["content"] or item["summary"])
                assistant["reasoning_content"] = assistant.get("reasoning_content", "") + text
            elif kind == "function_call":
                assistant.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                    "name": item["name"], "arguments": item["arguments"]}})
            else:
                content = item["content"]
                assistant["content"] += content if isinstance(content, str) else "".join(p["text"] for p in content)
            continue
        assistant = None
        if kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _parts(item["output"])})
        else:
            messages.append({"role": item["role"], "content": _parts(item["content"])})
    return messages


async def create_response(state: ServerState, req: ResponsesRequest, raw: Request):
    model = state.model_name(req.model)
    info = state.client.require_info()
    state.limits.check_max_tokens(req.max_output_tokens, "max_output_tokens")
    chat = chat_request(req)
    prompt = await state.prompt_workers.run(ChatPrompt, state, chat)
    params = sampling_params(chat, info, max_tokens=req.max_output_tokens, logprobs=None,
                             skip_special_tokens=not prompt.needs_special_tokens(state),
                             lora_request=state.lora_request(model))
    params = dataclasses.replace(params, grammar=await request_grammar(state, chat, prompt, info.vocab_size))
    gen = await Generation.start(state, [prompt.token_ids], params, api="responses")
    assembler = BlockAssembler(prompt.stream_parser(), max_tool_calls=None if req.parallel_tool_calls else 1)
    output = _Output(state, req, model, params)
    if req.stream:
        return stream_response(gen, output.stream(gen, assembler), None, done="", error_event=output.error_event)
    return await unless_disconnected(raw, output.complete(gen, assembler))


class _Output:
    """One response's items and events: item ids are made once per block, so the streamed items and the final
    response name the same ones."""

    def __init__(self, state: ServerState, req: ResponsesRequest, model: str, params):
        self._state = state
        self._ids: dict[int, str] = {}
        self._sequence = 0
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunctionChoice) else (
            req.tool_choice or "auto")
        effort = req.reasoning.effort if req.reasoning else None
        self.response = {
            "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "incomplete_details": None, "error": None, "model": model, "output": [],
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls, "temperature": params.temperature,
            "top_p": params.top_p, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "reasoning": {"effort": effort, "summary": None}, "text": {"format": {"type": "text"}},
            "store": False, "previous_response_id": None, "truncation": "disabled", "metadata": req.metadata or {},
            "usage": None}

    def _id(self, index: int, block: Block) -> str:
        prefix = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}[block.kind]
        return self._ids.setdefault(index, f"{prefix}_{uuid.uuid4().hex}")

    def item(self, index: int, block: Block, status: str = "completed") -> dict:
        item_id = self._id(index, block)
        done = status == "completed"
        if block.kind == "reasoning":
            content = [{"type": "reasoning_text", "text": block.text}] if done else []
            return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
        if block.kind == "text":
            return {"id": item_id, "type": "message", "role": "assistant", "status": status,
                    "content": [_text_part(block.text)] if done else []}
        function = block.call["function"]
        return {"id": item_id, "type": "function_call", "call_id": block.call["id"], "name": function["name"],
                "arguments": function["arguments"] if done else "", "status": status}

    def finished(self, gen: Generation, blocks: list[Block]) -> dict:
        (choice,) = gen.choices
        usage = gen.usage()
        tokenizer = self._state.tokenizer
        reasoning_tokens = sum(len(tokenizer.encode(b.text)) for b in blocks if b.kind == "reasoning")
        incomplete = choice.finish_reason == "length"
        return {**self.response, "status": "incomplete" if incomplete else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "output": [self.item(i, b) for i, b in enumerate(blocks)],
                "usage": {"input_tokens": usage.prompt_tokens,
                          "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details["cached_tokens"]},
                          "output_tokens": usage.completion_tokens,
                          "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
                          "total_tokens": usage.total_tokens}}

    async def complete(self, gen: Generation, assembler: BlockAssembler) -> JSONResponse:
        text = ""
        try:
            async for d in gen.deltas():
                text += d.text
        finally:
            gen.close()
        return JSONResponse(self.finished(gen, whole_blocks(assembler, text)))

    def event(self, kind: str, **data) -> str:
        self._sequence += 1
        payload = {"type": kind, "sequence_number": self._sequence - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def error_event(self, error: Exception) -> str:
        status, message, param, code = describe(error)
        return self.event("error", code=code or str(status), message=message, param=param)

    async def stream(self, gen: Generation, assembler: BlockAssembler) -> AsyncIterator[str]:
        yield self.event("response.created", response=self.response)
        yield self.event("response.in_progress", response=self.response)
        async for e in stream_block_events(assembler, gen):
            for sse in self.block_events(e):
                yield sse
        response = self.finished(gen, assembler.blocks)
        yield self.event(f"response.{response['status']}", response=response)

    def block_events(self, e: BlockEvent) -> list[str]:
        """A block event as the Responses API's events."""
        at = {"output_index": e.index}
        item_at = {"item_id": self._id(e.index, e.block), **at}
        part_at = {**item_at, "content_index": 0}
        kind = e.block.kind
        if kind == "tool_call":  # a call arrives whole: its arguments in one delta
            arguments = e.block.call["function"]["arguments"]
            return [] if e.type == "stop" else [
                self.event("response.output_item.added", **at, item=self.item(e.index, e.block, "in_progress")),
                self.event("response.function_call_arguments.delta", **item_at, delta=arguments),
                self.event("response.function_call_arguments.done", **item_at, arguments=arguments,
                           name=e.block.call["function"]["name"]),
                self.event("response.output_item.done", **at, item=self.item(e.index, e.block))]
        text_kind = "reasoning_text" if kind == "reasoning" else "output_text"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        if e.type == "start":
            part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else _text_part("")
            return [self.event("response.output_item.added", **at, item=self.item(e.index, e.block, "in_progress")),
                    self.event("response.content_part.added", **part_at, part=part)]
        if e.type == "delta":
            return [self.event(f"response.{text_kind}.delta", **part_at, delta=e.text, **extra)]
        item = self.item(e.index, e.block)
        return [self.event(f"response.{text_kind}.done", **part_at, text=e.block.text, **extra),
                self.event("response.content_part.done", **part_at, part=item["content"][0]),
                self.event("response.output_item.done", **at, item=item)]


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
