"""POST /v1/chat/completions: chat template, thinking mode, reasoning and tool-call parsing, streaming.

Choices made where the peers disagree or are silent:

* Thinking is on unless `chat_template_kwargs.enable_thinking` is false, or (when that key is absent) a top-level
  `enable_thinking: false` or `reasoning_effort: "none"` asks for it off.
* `tool_choice` defaults to "auto" with tools, "none" without. "none" leaves the tools out of the prompt, so the
  model has no reason to write calls, and parses none. Tool calling is on unless the server runs with
  `--tool-call-parser none` (vLLM's `--enable-auto-tool-choice` is accepted and not needed).
* "required" and a named function are enforced in GLM's own format: the prompt is made to end with
  `<think></think>\\n<tool_call>` (plus `NAME\\n` for a named function), so the model writes no reasoning and
  continues inside the call; the forced text is put back in front of the output before parsing. With thinking on,
  the empty think block is added, because the model was trained to open its turn with one.
  The rest of the call is then held to the tools' schemas by a grammar (serving/tool_grammar.py), as are calls to
  tools declared `"strict": true` under "auto" (and more with `--tool-strict-level`).
* `finish_reason` is "tool_calls" when the output holds a call and ended on a stop token (not on "length").
* `parallel_tool_calls: false` is enforced where a grammar holds the calls (one call, then a stop token);
  elsewhere the first call the model writes is returned (as vLLM does) and the others are dropped.
* `include_reasoning: false` (vLLM) leaves `reasoning_content` out; `separate_reasoning: false` (SGLang) leaves
  the reasoning unparsed, in the content. `stream_options.continuous_usage_stats` (vLLM) puts the usage so far in
  every chunk.
* Structured output (`response_format`, `structured_outputs`, `guided_*`, SGLang's fields): serving/
  structured_output.py; with thinking on, the grammar holds the answer after `</think>`, not the reasoning.
* `max_tokens` beyond what the context leaves is not an error: the output stops at the context end ("length").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import Request

from glmserve.serving.chat_template import normalize_messages, render_chat
from glmserve.serving.errors import APIError
from glmserve.serving.generation import (
    Generation,
    sampling_params,
    stream_response,
    unless_disconnected,
)
from glmserve.serving.parsers import Glm45StreamParser, parse_output
from glmserve.serving.parsers.glm45 import THINK_OPEN, TOOL_OPEN
from glmserve.serving.prompt_workers import check_fits
from glmserve.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    NamedToolChoice,
    random_id,
)
from glmserve.serving.state import ServerState
from glmserve.serving.structured_output import GrammarSpec
from glmserve.serving.tool_grammar import check_no_other_grammar, tool_call_grammar
from glmserve.types import GrammarConstraint, ParamError


class ChatPrompt:
    """The rendered prompt of a chat request and how its output is to be parsed (built in a prompt worker)."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest):
        tool_choice = req.tool_choice or ("auto" if req.tools else "none")
        use_tools = bool(req.tools) and tool_choice != "none"
        if use_tools and state.tool_call_parser is None:
            raise APIError(400, "tool calling is off on this server (--tool-call-parser none)", "tools")
        self.tools = [t.model_dump(exclude_unset=True) for t in req.tools] if use_tools else None
        self.text = render_prompt(state, req.messages, self.tools, req.add_generation_prompt, _template_kwargs(req))
        self.forced = ""  # text the output is forced to start with
        if isinstance(tool_choice, NamedToolChoice):
            self.forced = f"{TOOL_OPEN}{tool_choice.function.name}\n"
        elif tool_choice == "required":
            self.forced = TOOL_OPEN
        # Thinking mode is whatever the prompt says: with thinking off it ends with an empty think block.
        self.thinking = not self.text.endswith("</think>")
        if self.forced:  # the function name is the client's text, like the messages
            forced = TOOL_OPEN + state.tokenizer.mark_literal(self.forced[len(TOOL_OPEN):], switches=True)
            self.text += ("\n<think></think>" if self.thinking else "") + "\n" + forced
            self.thinking = False
        check_fits(self.text, state.tokenizer, state.client.require_info().max_model_len, "messages")
        self.token_ids = state.tokenizer.encode_marked(self.text)
        self.parse_reasoning = state.reasoning_parser is not None and req.separate_reasoning
        self.parse_tools = use_tools

    def needs_special_tokens(self, state: ServerState) -> bool:
        """Whether the parsers' markup tokens are special in this tokenizer, and so must not be skipped when
        decoding (vLLM decodes with special tokens whenever it parses tools, for the same reason)."""
        markup = ([THINK_OPEN] if self.parse_reasoning else []) + ([TOOL_OPEN] if self.parse_tools else [])
        ids = {state.tokenizer.token_to_id(tag) for tag in markup}
        return bool(ids & state.tokenizer.special_token_ids)

    def stream_parser(self) -> Glm45StreamParser | None:
        if not (self.parse_reasoning or self.parse_tools):
            return None
        parser = Glm45StreamParser(self.tools, self.thinking, self.parse_reasoning, self.parse_tools)
        parser.feed(self.forced)  # held back by the parser until the call closes
        return parser

    def parse(self, text: str):
        reasoning, content, calls = parse_output(self.forced + text, self.tools, self.thinking,
                                                 parse_reasoning=self.parse_reasoning, parse_tools=self.parse_tools)
        return reasoning, self.forced_content(content), calls

    def forced_content(self, content: str | None) -> str | None:
        """With the call forced, the grammar leaves no room for text: the only content can be a call cut off by
        max_tokens, which is returned as nothing (finish_reason "length"), not as raw markup."""
        return None if self.forced else content


_RENDER_ARGUMENTS = frozenset({"template", "messages", "tools", "add_generation_prompt"})  # set by render_chat


def render_prompt(state: ServerState, messages: list[ChatMessage], tools: list[dict] | None,
                  add_generation_prompt: bool, template_kwargs: dict) -> str:
    """The chat template applied to request messages (GLM45.md §1.5 normalisation first), with the client's text
    marked for `Tokenizer.encode_marked`: control-token strings typed in messages or tools stay text. Assistant
    turns are the model's own output, whose <think> and <tool_call> markup the template reads, so only the marker
    character is escaped in them. GLM's `/nothink` switch works in the client's own user and system text; in tool
    results and tool definitions (a third party's text: a web page, an API) and in assistant turns it is text."""
    dumped = []
    for m in messages:
        message = m.model_dump(exclude_unset=True)
        if message["role"] == "developer":  # OpenAI's newer name for system; GLM's template knows only system
            message["role"] = "system"
        dumped.append(_mark_literal(state, message, control_tokens=message["role"] != "assistant",
                                    switches=message["role"] in ("assistant", "tool")))
    reserved = set(template_kwargs) & _RENDER_ARGUMENTS
    if reserved:
        raise ParamError(f"chat_template_kwargs cannot set {', '.join(sorted(reserved))}", "chat_template_kwargs")
    # The request's kwargs may override the tokenizer's special tokens, as in vLLM.
    kwargs = {**state.tokenizer.special_tokens_map, **template_kwargs}
    return render_chat(state.chat_template, normalize_messages(dumped), _mark_literal(state, tools, switches=True),
                       add_generation_prompt, **kwargs)


def _mark_literal(state: ServerState, value, control_tokens: bool = True, switches: bool = False):
    """Every string in a JSON value (keys included) through `Tokenizer.mark_literal`."""
    if isinstance(value, str):
        return state.tokenizer.mark_literal(value, control_tokens, switches)
    if isinstance(value, dict):
        return {_mark_literal(state, k, control_tokens, switches): _mark_literal(state, v, control_tokens, switches)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_literal(state, v, control_tokens, switches) for v in value]
    return value


def _template_kwargs(req: ChatCompletionRequest) -> dict:
    kwargs = dict(req.chat_template_kwargs or {})
    if "enable_thinking" not in kwargs:
        if req.enable_thinking is not None:
            kwargs["enable_thinking"] = req.enable_thinking
        elif req.reasoning_effort == "none":
            kwargs["enable_thinking"] = False
    return kwargs


async def request_grammar(state: ServerState, req: ChatCompletionRequest, prompt: ChatPrompt,
                   vocab_size: int) -> GrammarConstraint | None:
    """The request's structured output, or its tool calls held to their schemas (serving/tool_grammar.py); the
    Anthropic and Responses APIs, translated to chat requests, get theirs here too."""
    spec = GrammarSpec.from_request(req)
    if prompt.tools:
        named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        tool_spec = tool_call_grammar(prompt.tools, named, req.tool_choice == "required", req.parallel_tool_calls,
                                      state.tool_strict_level)
        check_no_other_grammar(tool_spec, spec)
        spec = tool_spec or spec
    if spec is None:
        return None
    return await state.structured_output.compile(spec, vocab_size, thinking=prompt.thinking)


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    model = state.model_name(req.model)
    info = state.client.require_info()
    max_tokens = req.max_completion_tokens or req.max_tokens
    state.limits.check_max_tokens(max_tokens, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    prompt = await state.prompt_workers.run(ChatPrompt, state, req)
    params = sampling_params(
        req, info, max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        skip_special_tokens=req.skip_special_tokens and not prompt.needs_special_tokens(state),
        lora_request=state.lora_request(model, req.lora_path))
    params = dataclasses.replace(params, grammar=await request_grammar(state, req, prompt, info.vocab_size))
    gen = await Generation.start(state, [prompt.token_ids], params, api="chat")
    response_id, created = random_id("chatcmpl"), int(time.time())
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def usage_chunk() -> str:
            return _sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=[],
                                            usage=gen.usage()))

        return stream_response(gen, _stream(state, req, prompt, gen, response_id, created, model),
                               usage_chunk if include_usage else None)
    return await unless_disconnected(raw, _complete(state, req, prompt, gen, response_id, created, model))


async def _complete(state, req, prompt: ChatPrompt, gen: Generation, response_id, created, model):
    texts = {c.index: "" for c in gen.choices}
    logprobs = {c.index: [] for c in gen.choices} if req.logprobs else None
    try:
        async for d in gen.deltas():
            texts[d.choice.index] += d.text
            if logprobs is not None and d.logprobs:
                logprobs[d.choice.index].extend(d.logprobs)
    finally:
        gen.close()
    choices = []
    for c in gen.choices:
        reasoning, content, calls = prompt.parse(texts[c.index])
        reasoning = reasoning if req.include_reasoning else None
        calls = calls if req.parallel_tool_calls else calls[:1]
        empty = content is None and reasoning is None and not calls  # an empty answer is "", not null
        message = AssistantMessage(content="" if empty else content,
                                   reasoning_content=reasoning, tool_calls=calls or None)
        choice_logprobs = None if logprobs is None else ChoiceLogprobs(content=state.logprobs.chat(logprobs[c.index]))
        finish_reason = _finish_reason(c.finish_reason, bool(calls))
        choices.append(ChatChoice(index=c.index, message=message, logprobs=choice_logprobs,
                                  finish_reason=finish_reason, stop_reason=c.stop_reason))
    return ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=gen.usage())


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def _delta_message(deltas: list[dict]) -> DeltaMessage:
    """The parser's deltas of one step in one message (a field's pieces keep their order, which is all that
    reassembly needs)."""
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    return DeltaMessage(reasoning_content=reasoning or None, content=content or None, tool_calls=calls or None)


def _wanted(req: ChatCompletionRequest, delta: dict) -> bool:
    """Whether a parser delta is part of this request's answer (include_reasoning, parallel_tool_calls)."""
    if "reasoning_content" in delta:
        return req.include_reasoning
    return "tool_calls" not in delta or req.parallel_tool_calls or delta["tool_calls"][0]["index"] == 0


async def _stream(state, req, prompt: ChatPrompt, gen: Generation, response_id, created,
                  model) -> AsyncIterator[str]:
    continuous_usage = req.stream_options is not None and req.stream_options.continuous_usage_stats

    def chunk(choices) -> str:
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices,
                                        usage=gen.usage() if continuous_usage else None))

    parsers = {c.index: prompt.stream_parser() for c in gen.choices}
    for c in gen.choices:
        yield chunk([ChatStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
    async for d in gen.deltas():
        parser = parsers[d.choice.index]
        if parser is None:
            deltas = [{"content": d.text}] if d.text else []
        else:
            deltas = parser.feed(d.text) if d.text else []
            if d.finished:
                deltas += parser.finish()
            deltas = [x for x in deltas if "content" not in x or prompt.forced_content(x["content"]) is not None]
        delta = _delta_message([delta for delta in deltas if _wanted(req, delta)])
        if not (delta.content or delta.reasoning_content or delta.tool_calls or d.logprobs or d.finished):
            continue
        choice = ChatStreamChoice(index=d.choice.index, delta=delta)
        if req.logprobs and d.logprobs:
            choice.logprobs = ChoiceLogprobs(content=state.logprobs.chat(d.logprobs))
        if d.finished:
            has_calls = parser is not None and parser.num_tool_calls > 0
            choice.finish_reason = _finish_reason(d.choice.finish_reason, has_calls)
            choice.stop_reason = d.choice.stop_reason
        yield chunk([choice])
