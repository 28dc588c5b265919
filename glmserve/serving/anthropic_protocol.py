"""Anthropic Messages API request bodies (pydantic), as `POST /v1/messages` and `/v1/messages/count_tokens` take them.

Ranges follow Anthropic's API (temperature 0 to 1, max_tokens required); sizes are bounded as the OpenAI bodies
are. Unknown fields are ignored (`cache_control`, `citations`, `container`, `service_tier`, ...: prompt caching is
automatic here, by prefix). What GLM-4.5 cannot do is refused by name: image and document blocks (it reads text
only), server tools (web search, code execution: only the client's own tools can be called).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from glmserve.serving.protocol import MAX_MESSAGES, MAX_STOP, MAX_TOOLS, OpenAIModel, RequestBody
from glmserve.types import ParamError

_BLOCK_TYPES = {"user": ("text", "tool_result"), "assistant": ("text", "thinking", "tool_use")}
_MEDIA_BLOCKS = ("image", "document", "search_result")


class TextBlock(OpenAIModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(OpenAIModel):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(OpenAIModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False  # the model sees the content only: an error's text is what tells it

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _MEDIA_BLOCKS:
                    raise ParamError(f"{kind} blocks in a tool_result are not supported: GLM-4.5 reads text only",
                                     "messages")
        return data


class ThinkingBlock(OpenAIModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # glmserve signs nothing; a signature sent back is ignored


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(OpenAIModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @model_validator(mode="before")
    @classmethod
    def _check_block_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            role = data.get("role")
            allowed = _BLOCK_TYPES.get(role, ()) if isinstance(role, str) else ()
            for block in data["content"]:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind in _MEDIA_BLOCKS:
                    raise ParamError(f"{kind} content blocks are not supported: GLM-4.5 reads text only", "messages")
                if allowed and kind not in allowed:
                    raise ParamError(f"a {data['role']} message cannot hold a {kind!r} content block (it may hold "
                                     f"{', '.join(allowed)})", "messages")
        return data


class Tool(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _only_custom_tools(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ParamError(f"tool type {data['type']!r} is not supported: only the client's own (custom) tools "
                             f"can be called", "tools")
        return data


class ToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(OpenAIModel):
    """enabled and adaptive turn GLM-4.5's thinking on, disabled turns it off. budget_tokens is checked as
    Anthropic checks it and bounds nothing: max_tokens bounds reasoning and answer together (as in vLLM)."""

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)


class Metadata(OpenAIModel):
    user_id: str | None = None


class CountTokensRequest(RequestBody):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _check_tool_choice(self):
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ParamError(f"tool_choice {self.tool_choice.type!r} needs tools", "tool_choice")
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            names = {t.name for t in self.tools}
            if self.tool_choice.name not in names:
                raise ParamError(f"tool_choice names the tool {self.tool_choice.name!r}, which is not among the "
                                 f"tools ({', '.join(sorted(names))})", "tool_choice")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    # Sent in the body (the current SDK takes them through extra_body).
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
