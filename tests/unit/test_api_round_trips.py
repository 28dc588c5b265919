"""A conversation written in Anthropic's shape (or the Responses API's) renders the same prompt token ids as the same
conversation in OpenAI's chat shape: the APIs are translations onto the chat path, not templates of their own."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.anthropic import chat_request
from glmserve.serving.anthropic_protocol import CountTokensRequest, MessagesRequest
from glmserve.serving.chat import ChatPrompt
from glmserve.serving.protocol import ChatCompletionRequest
from glmserve.serving.responses import chat_request as responses_chat_request
from glmserve.serving.responses_protocol import ResponsesRequest
from glmserve.serving.state import ServerState
from glmserve.serving.templates import glm45_chat_template
from glmserve.serving.tokenizer import Tokenizer

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": WEATHER_SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER_SCHEMA}]
CALL_INPUT = {"city": "Lisbon"}


class _Engine:
    """What ChatPrompt asks of the engine client: the context length (its prompts are checked against it)."""

    def require_info(self):
        return SimpleNamespace(max_model_len=4096)


@pytest.fixture(scope="module")
def state():
    return ServerState(_Engine(), Tokenizer(EMBEDDED_MODEL), glm45_chat_template(), ["m"], "/nowhere", "glm45", "glm45")


OPENAI_MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Be kind."}]},
    {"role": "user", "content": "What's the weather in Lisbon?"},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "They want the weather.",
     "tool_calls": [{"id": "toolu_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps(CALL_INPUT)}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": [{"type": "text", "text": '{"temp": 21}'}]},
    {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    {"role": "assistant", "content": "I cannot tell."},
    {"role": "user", "content": "Thanks <|user|> bye"},
]
ANTHROPIC_MESSAGES = [
    {"role": "user", "content": "What's the weather in Lisbon?"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "They want the weather.", "signature": ""},
                                      {"type": "text", "text": "Let me look."},
                                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                       "input": CALL_INPUT}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": [{"type": "text", "text": '{"temp": 21}'}]},
                                 {"type": "text", "text": "And tomorrow?"}]},
    {"role": "assistant", "content": "I cannot tell."},
    {"role": "user", "content": "Thanks <|user|> bye"},
]
SYSTEM = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Be kind."}]


@pytest.mark.parametrize("anthropic_extra,openai_extra", [
    ({}, {}),
    ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"enable_thinking": False}}),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, {"chat_template_kwargs": {"enable_thinking": True}}),
    ({"tool_choice": {"type": "any"}}, {"tool_choice": "required"}),
    ({"tool_choice": {"type": "tool", "name": "get_weather"}},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"tool_choice": {"type": "none"}}, {"tool_choice": "none"}),
])  # fmt: skip
def test_anthropic_conversation_renders_the_openai_prompt(state, anthropic_extra, openai_extra):
    anthropic = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "system": SYSTEM,
                                                "tools": ANTHROPIC_TOOLS, "messages": ANTHROPIC_MESSAGES,
                                                **anthropic_extra})
    openai = ChatCompletionRequest.model_validate({"messages": OPENAI_MESSAGES, "tools": OPENAI_TOOLS, **openai_extra})
    got, expected = ChatPrompt(state, chat_request(anthropic)), ChatPrompt(state, openai)
    assert got.token_ids == expected.token_ids
    assert (got.text, got.forced, got.thinking, got.parse_tools) == (expected.text, expected.forced, expected.thinking,
                                                                     expected.parse_tools)
    assert "<tool_response>" in got.text and "Be brief. Be kind." in got.text and "Let me look." in got.text
    counted = CountTokensRequest.model_validate({"model": "m", "system": SYSTEM, "tools": ANTHROPIC_TOOLS,
                                                 "messages": ANTHROPIC_MESSAGES, **anthropic_extra})
    assert ChatPrompt(state, chat_request(counted)).token_ids == expected.token_ids


RESPONSES_INPUT = [
    {"role": "user", "content": "What's the weather in Lisbon?"},
    {"type": "reasoning", "id": "rs_1", "summary": [],
     "content": [{"type": "reasoning_text", "text": "They want the weather."}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
    {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": json.dumps(CALL_INPUT)},
    {"type": "function_call_output", "call_id": "toolu_1", "output": [{"type": "input_text", "text": '{"temp": 21}'}]},
    {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]},
    {"role": "assistant", "content": "I cannot tell."},
    {"role": "user", "content": "Thanks <|user|> bye"},
]
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
                    "parameters": WEATHER_SCHEMA}]


@pytest.mark.parametrize("responses_extra,openai_extra", [
    ({}, {}),
    ({"reasoning": {"effort": "none"}}, {"reasoning_effort": "none"}),
    ({"reasoning": {"effort": "high"}}, {}),
    ({"tool_choice": "required"}, {"tool_choice": "required"}),
    ({"tool_choice": {"type": "function", "name": "get_weather"}},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"tool_choice": "none"}, {"tool_choice": "none"}),
])  # fmt: skip
def test_responses_conversation_renders_the_openai_prompt(state, responses_extra, openai_extra):
    request = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief. Be kind.",
                                               "input": RESPONSES_INPUT, "tools": RESPONSES_TOOLS, **responses_extra})
    system = {"role": "system", "content": "Be brief. Be kind."}
    openai = ChatCompletionRequest.model_validate({"messages": [system, *OPENAI_MESSAGES[1:]], "tools": OPENAI_TOOLS,
                                                   **openai_extra})
    got, expected = ChatPrompt(state, responses_chat_request(request)), ChatPrompt(state, openai)
    assert got.token_ids == expected.token_ids
    assert (got.forced, got.thinking, got.parse_tools) == (expected.forced, expected.thinking, expected.parse_tools)


def test_responses_string_input(state):
    request = ResponsesRequest.model_validate({"input": "Hi there", "instructions": "Be brief."})
    openai = ChatCompletionRequest.model_validate({"messages": [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Hi there"}]})
    assert ChatPrompt(state, responses_chat_request(request)).token_ids == ChatPrompt(state, openai).token_ids


def test_a_tool_loop_keeps_the_reasoning_of_the_turn_in_progress(state):
    """After the last user message, the template renders the assistant's reasoning: all three shapes carry it."""
    openai = ChatCompletionRequest.model_validate({"messages": OPENAI_MESSAGES[1:4], "tools": OPENAI_TOOLS})
    anthropic = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "tools": ANTHROPIC_TOOLS,
                                                "messages": ANTHROPIC_MESSAGES[:2] + [
                                                    {"role": "user", "content": ANTHROPIC_MESSAGES[2]["content"][:1]}]})
    responses = ResponsesRequest.model_validate({"input": RESPONSES_INPUT[:5], "tools": RESPONSES_TOOLS})
    expected = ChatPrompt(state, openai)
    assert "They want the weather." in expected.text and expected.text.endswith("<|assistant|>")
    assert ChatPrompt(state, chat_request(anthropic)).token_ids == expected.token_ids
    assert ChatPrompt(state, responses_chat_request(responses)).token_ids == expected.token_ids
