"""glmserve's own GLM-4.5 chat template: GLM45.md §1.4 byte for byte, and the reference template's output on more."""

import copy
from pathlib import Path

import pytest
from glm45_examples import EXAMPLES, WEATHER_TOOL, user

from glmserve.serving.chat_template import normalize_messages, render_chat
from glmserve.serving.templates import glm45_chat_template

OWN = glm45_chat_template()
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "glm45_chat_template.jinja"


@pytest.mark.parametrize("name,messages,tools,agp,kwargs,expected", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_render_byte_for_byte(name, messages, tools, agp, kwargs, expected):
    assert render_chat(OWN, messages, tools, add_generation_prompt=agp, **kwargs) == expected


ASSISTANT_CALL = {"role": "assistant", "content": "ok", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京", "n": null}'}},
    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}  # fmt: skip
MORE_CASES = [
    ("inline_think_history", [user("a"), {"role": "assistant", "content": "<think>x</think>\n\ny"}, user("b")], {}),
    ("reasoning_after_last_user", [user("a"), {"role": "assistant", "content": "", "reasoning_content": " r "}], {}),
    ("tool_round_trip_thinking_off", [user("w"), ASSISTANT_CALL, {"role": "tool", "content": "r1"},
                                      {"role": "tool", "content": "r2"}, user("more")], {"enable_thinking": False}),
    ("tool_after_system", [{"role": "system", "content": "s"}, {"role": "tool", "content": "t"}], {}),
    ("list_contents", [{"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "image_url"}]},
                       {"role": "tool", "content": ["o", {"x": 1}]}], {"enable_thinking": True}),
    ("unknown_role_is_skipped", [{"role": "critic", "content": "c"}, user("u")], {}),
    ("empty", [], {}),
]  # fmt: skip


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"reference chat template not found at {REFERENCE}")
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("name,messages,kwargs", MORE_CASES, ids=[c[0] for c in MORE_CASES])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no_tools", "tools"])
def test_same_as_reference(name, messages, kwargs, tools, agp):
    reference = REFERENCE.read_text(encoding="utf-8")
    normalized = normalize_messages(copy.deepcopy(messages))
    expected = render_chat(reference, normalized, tools, add_generation_prompt=agp, **kwargs)
    assert render_chat(OWN, normalized, tools, add_generation_prompt=agp, **kwargs) == expected
