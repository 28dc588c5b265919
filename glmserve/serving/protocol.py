"""OpenAI request and response bodies (pydantic), with vLLM's extra sampling fields.

Ranges are checked here so that a bad value is a 400 naming its field before anything else runs (validators raise
`ParamError`, whose `param` the error handler reports); the rest of the sampling checks live in `SamplingParams`.
Unknown request fields are ignored, as OpenAI's own server does. Responses are built from these models too: whole
responses keep their null fields (as vLLM's do), stream chunks drop them to stay small.

Sizes are bounded here too (OpenAI's limits where it has them: n and tools at most 128), so that no field can make
the server do unbounded work: floats must be finite, a seed fits the sampler's 64-bit generator, and the number of
messages and stop strings is capped. What depends on the engine (max_tokens against the context length, sequences
against the queue) is checked when the request is served.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glmserve.serving.structured_fields import StructuredOutputFields
from glmserve.types import ParamError

NonNegInt = Annotated[int, Field(ge=0)]

MAX_N = 128  # OpenAI's own limit
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's own limit
MAX_STOP = 64  # stop strings or stop token ids
MAX_PROMPTS = 1024  # prompts in one /v1/completions batch (each still counts against the queue)
# Arrays and objects inside one another, anywhere in a body: the template's argument walks and json.dumps recurse,
# and a deep enough value would hit Python's recursion limit (a 500). A JSON schema ten levels deep is ~25.
MAX_JSON_DEPTH = 64


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # NaN and Infinity are valid JSON to Python, and a NaN slips through every range check.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestBody(OpenAIModel):
    """A whole request body."""

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        check_json(data)
        return data


def check_json(value: Any) -> None:
    """Raise ParamError if a request body nests deeper than MAX_JSON_DEPTH or holds a string that is not text.

    JSON may spell a lone UTF-16 surrogate ("\\ud800"), which Python keeps in a str but no tokenizer, and no UTF-8
    response quoting it, can encode. The walk is iterative, so a hostile depth cannot exhaust the stack, and
    cheap on a huge ASCII string (15 MB: about a millisecond)."""
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    raise ParamError("the request holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                                     "which is not text") from None
            continue
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ParamError(f"the request nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
        todo.extend((child, depth + 1) for child in children)


# ---- shared request parts ---------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: the usage so far in every chunk


class SamplingFields(RequestBody, StructuredOutputFields):
    """The sampling fields chat and completions share (OpenAI's, then vLLM's extras; structured output's fields
    are checked where they are compiled, serving/structured_output.py)."""

    model: str | None = None
    lora_path: str | None = None  # SGLang: the LoRA adapter (its --lora-paths name) to run with, over `model`
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # int64, as vLLM: torch's generators refuse more than 64 bits (and killed the engine); seed + sample index
    # for parallel samples still fits their unsigned range.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: NonNegInt = 0
    stop_token_ids: list[NonNegInt] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise ParamError("stop strings must not be empty", "stop")
        if self.logit_bias:
            raise ParamError("logit_bias is not supported", "logit_bias")
        return self


# ---- chat ---------------------------------------------------------------------------------------------------------


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(BaseModel):
    """A chat message; extra fields (`reasoning_content`, `name`, ...) are kept and reach the template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any] | str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


_MEDIA_PARTS = frozenset({"image_url", "input_audio", "audio_url", "video_url", "file", "image"})


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # vLLM / SGLang extras
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True  # vLLM: false leaves reasoning_content out of the response
    separate_reasoning: bool = True  # SGLang: false leaves the reasoning in the content, unparsed
    # OpenAI's deprecated function calling: refused with a pointer to tools (see _refuse_unsupported)
    functions: list[Any] | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        """What a GLM-4.5 server cannot do gets a 400 naming it, not silence."""
        if self.functions is not None or self.function_call is not None:
            raise ParamError("functions and function_call (deprecated by OpenAI) are not supported; send tools and "
                             "tool_choice", "functions" if self.functions is not None else "function_call")
        for message in self.messages:
            for part in message.content if isinstance(message.content, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _MEDIA_PARTS:
                    raise ParamError(f"{kind} content parts are not supported: GLM-4.5 reads text only", "messages")
        return self

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs needs logprobs set to true", "top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = {t.function.name for t in self.tools or ()}
            if not names:
                raise ParamError("tool_choice 'required' or a named function needs tools", "tool_choice")
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                raise ParamError(f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                 f"which is not among the tools ({', '.join(sorted(names))})", "tool_choice")
        return self


# ---- completions ------------------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[int] | Annotated[
        list[list[int]], Field(max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    return_token_ids: bool = False  # vLLM's extension: prompt and output token ids in the choices

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ParamError("echo is not supported", "echo")
        if self.suffix:
            raise ParamError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of is not supported (it must equal n)", "best_of")
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ("", []) for p in self.prompt)):
            raise ParamError("prompt must not be empty", "prompt")
        return self


# ---- tokenizer endpoints (vLLM's shapes) ------------------------------------------------------------------------


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("give exactly one of prompt and messages", "prompt")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[NonNegInt]


# ---- responses --------------------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids (a stream sends them in its first chunk)
    token_ids: list[int] | None = None  # with return_token_ids (a stream: this chunk's new tokens)


class CompletionResponse(BaseModel):
    """Both the whole response and a stream chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "glmserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
