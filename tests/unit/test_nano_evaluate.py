"""The nano evaluation asks the server what training taught: its requests render to exactly the training prompts,
and the training completions, parsed as the server parses them, pass every check."""

import json
from types import SimpleNamespace

import pytest

from glmserve.models import EMBEDDED_MODEL
from glmserve.nano.corpus import OBSERVATION, USER
from glmserve.nano.evaluate import KINDS, RATES, heldout_cases, request_messages, score
from glmserve.serving.chat import ChatPrompt
from glmserve.serving.parsers.glm45 import parse_output
from glmserve.serving.protocol import ChatCompletionRequest
from glmserve.serving.templates import glm45_chat_template
from glmserve.serving.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def cases():
    return heldout_cases(seed=5, per_kind=10)


def test_requests_render_to_the_training_prompts(cases):
    # The server's own prompt building, on the JSON body the openai client would send.
    state = SimpleNamespace(chat_template=glm45_chat_template(), tool_call_parser="glm45", reasoning_parser="glm45",
                            tokenizer=Tokenizer(EMBEDDED_MODEL),
                            client=SimpleNamespace(require_info=lambda: SimpleNamespace(max_model_len=4096)))
    for kind in KINDS:
        for e in cases[kind]:
            body = {"model": "nano", "messages": request_messages(e.messages),
                    "chat_template_kwargs": {"enable_thinking": e.thinking}, **({"tools": e.tools} if e.tools else {})}
            request = ChatCompletionRequest.model_validate(json.loads(json.dumps(body)))
            assert ChatPrompt(state, request).text == e.prompt, kind


def test_request_messages_answer_tool_calls_by_id(cases):
    messages = request_messages(cases["tool_answer"][0].messages)
    ids = [c["id"] for m in messages for c in m.get("tool_calls", ())]
    assert ids and [m["tool_call_id"] for m in messages if m["role"] == "tool"] == ids
    assert all(isinstance(c["function"]["arguments"], str) for m in messages for c in m.get("tool_calls", ()))


def test_training_completions_pass_every_check_and_empty_replies_none(cases):
    for kind in KINDS:
        for e in cases[kind]:
            text = e.completion.removesuffix(OBSERVATION).removesuffix(USER)
            assert all(score(kind, e, *parse_output(text, e.tools, e.thinking)).values()), (kind, e.completion)
            assert not any(score(kind, e, None, None, []).values()), kind


def test_every_check_is_a_rate_and_every_rate_a_check(cases):
    for kind in KINDS:
        e = cases[kind][0]
        checks = score(kind, e, *parse_output(e.completion.removesuffix(OBSERVATION).removesuffix(USER), e.tools,
                                              e.thinking))
        assert set(checks) == {check for rate_kind, check in RATES.values() if rate_kind == kind}, kind


def test_cases_of_some_kinds_are_those_of_a_full_draw(cases):
    # `--kinds tool_call --per-kind N` measures the first N tool_call turns, the same ones a full run measures.
    subset = heldout_cases(seed=5, per_kind=15, kinds=("tool_call",))
    assert list(subset) == ["tool_call"]
    assert subset["tool_call"][:10] == cases["tool_call"]


def test_user_style_calls_are_valid_only_with_the_schemas_keys_and_types(cases):
    e = cases["tool_call_user"][0]
    (wanted,) = e.expected["calls"]

    def reply(name, arguments):
        return [{"function": {"name": name, "arguments": json.dumps(arguments)}}]

    assert score("tool_call_user", e, None, None, reply(wanted["name"], wanted["arguments"]))["valid"]
    key, value = next(iter(wanted["arguments"].items()))
    recalled = {("x_" + k if k == key else k): v for k, v in wanted["arguments"].items()}  # a key not in the schema
    assert score("tool_call_user", e, None, None, reply(wanted["name"], recalled)) == {
        "name": True, "exact": False, "valid": False, "called": True}
    extra = {**wanted["arguments"], "x_" + key: value}
    assert not score("tool_call_user", e, None, None, reply(wanted["name"], extra))["valid"]
    mistyped = {**wanted["arguments"], key: [value]}
    assert not score("tool_call_user", e, None, None, reply(wanted["name"], mistyped))["valid"]
    assert not score("tool_call_user", e, None, None, reply("not_listed", wanted["arguments"]))["valid"]
    assert score("tool_call_user", e, None, "No tool fits.", []) == {"name": False, "exact": False, "valid": False,
                                                                     "called": False}
