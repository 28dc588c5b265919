"""OpenAI Responses API request bodies (pydantic), as `POST /v1/responses` takes them.

Stateless: `previous_response_id` is refused (nothing is stored; send the whole conversation as `input`). Unknown
fields are ignored, as on chat; what GLM-4.5 cannot do is refused by name: image and file inputs (it reads text
only), built-in tools (web search, file search, ...: only function tools, which the client runs), structured text
formats (`text.format` other than text).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from glmserve.serving.protocol import MAX_MESSAGES, MAX_TOOLS, OpenAIModel, RequestBody
from glmserve.types import ParamError


class TextPart(OpenAIModel):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    @model_validator(mode="before")
    @classmethod
    def _refuse_media(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("input_image", "input_file", "input_audio"):
                    raise ParamError(f"{kind} content is not supported: GLM-4.5 reads text only", "input")
        return data


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(OpenAIModel):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None  # the reasoning itself (glmserve sends it here), else the summary


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextConfig(OpenAIModel):
    format: dict[str, Any] | None = None


class ReasoningConfig(OpenAIModel):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None  # GLM-4.5's reasoning is returned whole, never summarized


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True  # accepted, never honoured: glmserve keeps no responses (the response says store: false)
    previous_response_id: str | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_items(cls, data: Any) -> Any:
        """Input items without a type are messages (OpenAI's EasyInputMessage); tools that are not functions are
        refused by name."""
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("input"), list):
            data = {**data, "input": [{"type": "message", **item} if isinstance(item, dict) and "type" not in item
                                      else item for item in data["input"]]}
        tools = data.get("tools")
        for tool in tools if isinstance(tools, list) else ():
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ParamError(f"tool type {tool.get('type')!r} is not supported: only function tools (run by the "
                                 f"client) can be called", "tools")
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.previous_response_id is not None:
            raise ParamError("previous_response_id is not supported: glmserve stores no responses; send the whole "
                             "conversation as input (stateless, as with store: false)", "previous_response_id")
        format_type = ((self.text.format if self.text else None) or {}).get("type", "text")
        if format_type != "text":
            raise ParamError(f"text.format {format_type!r} is not supported", "text")
        if isinstance(self.tool_choice, NamedFunctionChoice) or self.tool_choice == "required":
            names = {t.name for t in self.tools or ()}
            if not names:
                raise ParamError("tool_choice 'required' or a named function needs tools", "tool_choice")
            if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in names:
                raise ParamError(f"tool_choice names the function {self.tool_choice.name!r}, which is not among the "
                                 f"tools ({', '.join(sorted(names))})", "tool_choice")
        return self
