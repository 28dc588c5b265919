"""The GLM-4.5 chat template rendered byte for byte (GLM45.md §1.4), normalisation, sandboxing, transformers parity."""

import copy
import json
from pathlib import Path

import pytest
from glm45_examples import EXAMPLES, TOOLS_FOOTER, TOOLS_HEADER, WEATHER_TOOL, user

from glmserve.serving.chat_template import ChatTemplateError, normalize_messages, render_chat

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
TEMPLATE_PATH = REFERENCE / "glm45_chat_template.jinja"
if not TEMPLATE_PATH.exists():
    pytest.skip(f"reference chat template not found at {TEMPLATE_PATH}", allow_module_level=True)
TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize("name,messages,tools,agp,kwargs,expected", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_reference_examples_render_byte_for_byte(name, messages, tools, agp, kwargs, expected):
    assert render_chat(TEMPLATE, messages, tools, add_generation_prompt=agp, **kwargs) == expected


def test_enable_thinking_true_is_like_undefined():
    assert render_chat(TEMPLATE, [user("hi")], enable_thinking=True) == EXAMPLES[0][-1]


def test_normalized_null_content_is_empty_not_none():
    messages = [user("q"), {"role": "assistant", "content": None, "reasoning_content": "r"}]
    rendered = render_chat(TEMPLATE, normalize_messages(messages), add_generation_prompt=False)
    assert rendered == "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>r</think>"


def test_api_request_example():
    """The second request of zai-org/GLM-4.5 inference/api_request.py, as the OpenAI client sends it."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "获取指定城市的天气",
        "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "城市"}},
                       "required": ["location"], "additionalProperties": False}}}  # fmt: skip
    messages = [
        {"role": "system", "content": "请你调用工具，用中文回答问题。"},
        {"role": "user", "content": "请帮我查询一下北京的天气。"},
        {"role": "assistant", "content": None, "reasoning_content": "用户想查询北京的天气。", "tool_calls": [
            {"id": "tool-call-bf208d1d-9b5f-407f-8c6e-c35e54aa2fef", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"location\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "tool-call-bf208d1d-9b5f-407f-8c6e-c35e54aa2fef",
         "content": "{\"city\": \"北京\", \"date\": \"2024-06-27\", \"weather\": \"晴\", \"temperature\": \"26C\"}"},
    ]  # fmt: skip
    expected = (
        "[gMASK]<sop>"
        + TOOLS_HEADER
        + '{"type": "function", "function": {"name": "get_weather", "description": "获取指定城市的天气", "parameters": '
        '{"type": "object", "properties": {"location": {"type": "string", "description": "城市"}}, "required": '
        '["location"], "additionalProperties": false}}}\n' + TOOLS_FOOTER
        + "<|system|>\n请你调用工具，用中文回答问题。<|user|>\n请帮我查询一下北京的天气。/nothink<|assistant|>\n"
        "<think>用户想查询北京的天气。</think>\n<tool_call>get_weather\n<arg_key>location</arg_key>\n"
        "<arg_value>北京</arg_value>\n</tool_call><|observation|>\n<tool_response>\n"
        '{"city": "北京", "date": "2024-06-27", "weather": "晴", "temperature": "26C"}\n'
        "</tool_response><|assistant|>\n<think></think>"
    )
    original = copy.deepcopy(messages)
    rendered = render_chat(TEMPLATE, normalize_messages(messages), [tool], enable_thinking=False)
    assert rendered == expected
    assert messages == original  # normalisation copies


# --- normalize_messages -----------------------------------------------------------------------------------------


def test_normalize_tool_call_arguments():
    calls = [
        {"type": "function", "function": {"name": "a", "arguments": '{"x": 1, "s": "北京"}'}},
        {"type": "function", "function": {"name": "b", "arguments": ""}},
        {"type": "function", "function": {"name": "c", "arguments": None}},
        {"name": "d", "arguments": '{"y": [1]}'},
    ]
    (m,) = normalize_messages([{"role": "assistant", "content": None, "tool_calls": calls}])
    assert m["content"] == ""
    assert [tc["function"]["arguments"] for tc in m["tool_calls"][:3]] == [{"x": 1, "s": "北京"}, {}, {}]
    assert m["tool_calls"][3]["arguments"] == {"y": [1]}
    assert calls[0]["function"]["arguments"] == '{"x": 1, "s": "北京"}'  # input untouched


def test_normalize_drops_empty_tool_calls_and_none_keys():
    (m,) = normalize_messages([{"role": "assistant", "content": "hi", "tool_calls": [], "name": None}])
    assert m == {"role": "assistant", "content": "hi"}
    (m,) = normalize_messages([{"role": "user"}])
    assert m == {"role": "user", "content": ""}


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", "3"])
def test_normalize_rejects_bad_arguments(arguments):
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}]
    with pytest.raises(ChatTemplateError):
        normalize_messages(messages)


def test_normalize_forwards_reasoning():
    messages = [user("q"), {"role": "assistant", "content": "a", "reasoning": "why"}]
    normalized = normalize_messages(messages)
    assert normalized[1]["reasoning_content"] == "why"
    rendered = render_chat(TEMPLATE, normalized, add_generation_prompt=False)
    assert rendered.endswith("<|assistant|>\n<think>why</think>\na")


def test_list_contents():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "S"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "data:x"}},
            {"type": "input_audio"}, "plain", {"no_type": 1}, {"type": "text", "text": "!"}]},
        {"role": "tool", "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]},
    ]  # fmt: skip
    rendered = render_chat(TEMPLATE, normalize_messages(messages))
    assert rendered == (
        "[gMASK]<sop><|system|>\nS<|user|>\nlook: plain!<|observation|>\n<tool_response>\nr1r2\n</tool_response>"
        "<|assistant|>"
    )


def test_pydantic_like_messages_are_dumped():
    class Message:
        def model_dump(self):
            return {"role": "user", "content": "hi", "name": None}

    assert render_chat(TEMPLATE, normalize_messages([Message()])) == EXAMPLES[0][-1]


# --- environment: errors, sandbox, transformers' globals -------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'a': 1}) }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ namespace(__class__=1) }}",
        "{{ raise_exception('no system messages') }}",
        "{{ 'a' + 1 }}",
        "{% for k, v in messages[0].content.items() %}{% endfor %}",
        "{% if %}",
    ],
)
def test_template_failures_raise_chat_template_error(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [user("hi")])


def test_raise_exception_message_is_kept():
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        render_chat("{{ raise_exception('only user and assistant') }}", [user("hi")])


def test_unsafe_attribute_renders_nothing():
    # As in transformers: a single unsafe lookup is undefined (empty), never the object.
    assert render_chat("{{ ''.__class__ }}|{{ messages.__len__ }}", [user("hi")]) == "|"


ENV_TEMPLATE = (
    "{{ {'a': '<b>&é'} | tojson }}|{{ [1, 2] | tojson(indent=1) }}|{{ 'é' | tojson(ensure_ascii=True) }}|"
    "{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
    "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.n }}|{{ dict(x=1) }}|{{ dict.fromkeys(['k']) }}|"
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}|{{ strftime_now('%Y') | length }}|"
    "{{ eos_token }}|{{ documents is none }}|{{ tools is none }}|{{ add_generation_prompt }}"
)


def test_environment_globals():
    rendered = render_chat(ENV_TEMPLATE, [user("a"), user("b")], eos_token="<|endoftext|>")
    assert rendered == (
        '{"a": "<b>&é"}|[\n 1,\n 2\n]|"\\u00e9"|user|2|{\'x\': 1}|{\'k\': None}|b|4|<|endoftext|>|True|True|True'
    )


# --- parity with transformers' apply_chat_template --------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from glmserve.testing.tokenizer import save_test_tokenizer

    directory = tmp_path_factory.mktemp("glm_tokenizer")
    save_test_tokenizer(directory, chat_template=TEMPLATE)
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


PARITY_CASES = [e for e in EXAMPLES if e[0] in ("E1", "E2", "E5", "E8", "E9", "E10", "E11", "E12", "E13")] + [
    ("reasoning", [user("q"), {"role": "assistant", "content": "a", "reasoning": "why"}], None, False, {}, None),
    ("thinking_off_tools", [user("天气?")], [WEATHER_TOOL], True, {"enable_thinking": False}, None),
]


@pytest.mark.parametrize("name,messages,tools,agp,kwargs,_", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_matches_transformers(hf_tokenizer, name, messages, tools, agp, kwargs, _):
    from glmserve.serving.tokenizer import Tokenizer

    directory, hf = hf_tokenizer
    tokenizer = Tokenizer(directory)
    expected = hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools, add_generation_prompt=agp, tokenize=False, **kwargs
    )
    ours = render_chat(
        tokenizer.chat_template, normalize_messages(messages), tools, agp, **tokenizer.special_tokens_map, **kwargs
    )
    assert ours == expected
    expected_ids = hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools, add_generation_prompt=agp, return_dict=False, **kwargs
    )
    assert tokenizer.encode(ours) == list(expected_ids)


def test_environment_matches_transformers(hf_tokenizer):
    from glmserve.serving.tokenizer import Tokenizer

    directory, hf = hf_tokenizer
    messages = [user("a"), user("b")]
    expected = hf.apply_chat_template(messages, chat_template=ENV_TEMPLATE, tokenize=False)
    ours = render_chat(ENV_TEMPLATE, messages, add_generation_prompt=False, **Tokenizer(directory).special_tokens_map)
    assert ours == expected


def test_tools_json_line_is_json_dumps():
    rendered = render_chat(TEMPLATE, [user("x")], [WEATHER_TOOL])
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in rendered
