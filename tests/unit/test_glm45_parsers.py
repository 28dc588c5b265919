"""GLM-4.5 reasoning / tool-call parsers: examples, and streamed == non-streamed for any chunking."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmserve.serving.parsers.glm45 import (
    Glm45StreamParser,
    ReasoningStreamParser,
    ToolCallStreamParser,
    merge_deltas,
    parse_output,
    parse_reasoning,
    parse_tool_calls,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def chunk(text: str, cuts) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def stream(text, cuts=(), tools=None, **kw):
    """Feed ``text`` cut at ``cuts``; check delta hygiene; return (merged result, deltas)."""
    p = Glm45StreamParser(tools, id_factory=ids(), **kw)
    deltas = []
    for piece in chunk(text, cuts):
        deltas += p.feed(piece)
    deltas += p.finish()
    for d in deltas:
        assert len(d) == 1, d
        (key, value), = d.items()
        assert key in ("reasoning_content", "content", "tool_calls")
        assert value, d  # never an empty string / list
    assert p.num_tool_calls == len(merge_deltas(deltas)[2])
    return merge_deltas(deltas), deltas


def assert_equivalent(text, cuts=(), tools=None, **kw):
    expected = parse_output(text, tools, id_factory=ids(), **kw)
    got, _ = stream(text, cuts, tools, **kw)
    assert got == expected
    return expected


def call(name, args=None, id_="call_0"):
    return {"id": id_, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args or {}, ensure_ascii=False)}}


def render_call(name, args: dict, name_sep="\n", kv_sep="\n") -> str:
    """Render a call the way GLM-4.5's template does (GLM45.md §1.3)."""
    out = f"<tool_call>{name}{name_sep}"
    for k, v in args.items():
        raw = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        out += f"<arg_key>{k}</arg_key>{kv_sep}<arg_value>{raw}</arg_value>\n"
    return out + "</tool_call>"


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string"}}}}}]

TYPED = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
    "b": {"type": "boolean"}, "z": {"type": "null"}, "o": {"type": "object"}, "a": {"type": "array"},
    "sn": {"type": ["string", "null"]}, "any_s": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "e": {"enum": ["1", "2"]}, "ei": {"enum": [1, 2]}}}}}]


# ---------------------------------------------------------------- reasoning examples

@pytest.mark.parametrize("text, thinking, expected", [
    ("\n<think>Let me think.</think>\nThe answer is 4.", True, ("Let me think.", "The answer is 4.")),
    ("<think>r</think>c", True, ("r", "c")),
    ("\n<think>\nmulti\nline\n</think>\n\nc\n", True, ("\nmulti\nline\n", "c\n")),  # reasoning verbatim
    ("\n<think>cut off by max_tok", True, ("cut off by max_tok", None)),
    ("\n<think>", True, (None, None)),
    ("<think></think>", True, (None, None)),
    ("<think>r</think>\n  \n", True, ("r", None)),
    ("Hello <think>x</think>", True, (None, "Hello <think>x</think>")),  # no think at the start
    ("\nJust content.", True, (None, "Just content.")),
    ("<thi", True, (None, "<thi")),
    ("", True, (None, None)),
    ("\nHello", False, (None, "Hello")),
    ("<think>x</think>y", False, (None, "<think>x</think>y")),
    ("   ", False, (None, None)),
    ("<think>a</think>b</think>c<think>d", True, ("a", "b</think>c<think>d")),
])
def test_reasoning_examples(text, thinking, expected):
    assert parse_reasoning(text, thinking) == expected
    for cuts in ([], range(1, len(text))):
        p = ReasoningStreamParser(thinking)
        parts = [p.feed(c) for c in chunk(text, cuts)] + [p.finish()]
        r = "".join(d.get("reasoning_content", "") for d in parts) or None
        c = "".join(d.get("content", "") for d in parts) or None
        assert (r, c) == expected
        assert all(v for d in parts for v in d.values())


def test_reasoning_stream_is_live():
    p = ReasoningStreamParser()
    assert p.feed("\n") == {}
    assert p.feed("<thi") == {}
    assert p.feed("nk>Step one") == {"reasoning_content": "Step one"}
    assert p.in_reasoning
    assert p.feed(" and </th") == {"reasoning_content": " and "}
    assert p.feed("ink>\n") == {}
    assert p.feed("Answer") == {"content": "Answer"}
    assert p.finish() == {}
    q = ReasoningStreamParser()
    assert q.feed("Hi") == {"content": "Hi"}  # no <think>: content straight away
    assert ReasoningStreamParser(thinking=False).feed("<think>") == {"content": "<think>"}


# ---------------------------------------------------------------- tool-call examples

def test_weather_example_with_thinking():
    text = ("\n<think>The user wants the weather.</think>\nI'll help you check the weather. "
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>")
    expected = ("The user wants the weather.", "I'll help you check the weather.",
                [call("get_weather", {"city": "北京", "days": 3})])
    assert parse_output(text, WEATHER, id_factory=ids()) == expected
    assert '"北京"' in expected[2][0]["function"]["arguments"]  # ensure_ascii=False
    for cuts in ([], range(1, len(text)), [3, 9, 40, 41, 100]):
        assert stream(text, cuts, WEATHER)[0] == expected


def test_several_calls_and_text_between_and_after():
    c1 = render_call("get_weather", {"city": "Paris"})
    c2 = render_call("get_weather", {"city": "Rome", "days": 2})
    c3 = render_call("now", {})
    text = f"First. {c1}\n{c2}\nBetween  \n\n {c3} After.\n"
    content, calls = parse_tool_calls(text, WEATHER, ids())
    assert content == "First.\nBetween\nAfter.\n"
    assert calls == [call("get_weather", {"city": "Paris"}, "call_0"),
                     call("get_weather", {"city": "Rome", "days": 2}, "call_1"),
                     call("now", {}, "call_2")]
    for cuts in ([], range(1, len(text))):
        assert assert_equivalent(text, cuts, WEATHER)[1:] == (content, calls)


def test_only_calls_gives_none_content():
    text = "\n<think>t</think>\n" + render_call("a", {}) + "\n" + render_call("b", {"x": 1}) + "\n"
    assert parse_output(text, None, id_factory=ids()) == (
        "t", None, [call("a", {}, "call_0"), call("b", {"x": 1}, "call_1")])


@pytest.mark.parametrize("body", ["now", "now\n", " now \n\n", "now<arg_key>"])
def test_zero_arg_calls(body):
    content, calls = parse_tool_calls(f"<tool_call>{body}</tool_call>", None, ids())
    assert content is None and calls == [call("now", {})]
    assert calls[0]["function"]["arguments"] == "{}"


def test_name_ends_at_arg_key():
    text = "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"
    assert parse_tool_calls(text, None, ids())[1] == [call("f", {"a": 1})]


@pytest.mark.parametrize("key, raw, value", [
    ("s", "007", "007"),  # string param that looks like a number stays a string
    ("s", "  padded\n text ", "  padded\n text "),  # verbatim, whitespace included
    ("s", "true", "true"),
    ("s", '{"a": 1}', '{"a": 1}'),
    ("s", "", ""),
    ("i", "42", 42), ("i", " -7 \n", -7),
    ("n", "3.5", 3.5), ("n", "1e3", 1000.0),
    ("b", "true", True), ("b", "False", False),  # Python literal fallback
    ("z", "null", None), ("z", "None", None),
    ("o", '{"k": [1, "é", null]}', {"k": [1, "é", None]}),
    ("o", "{'k': (1, 2)}", {"k": [1, 2]}),
    ("a", "[1, 2.5, \"x\"]", [1, 2.5, "x"]),
    ("a", "[1, 2", "[1, 2"),  # unparsable: raw text
    ("n", "NaN", "NaN"), ("n", "1e999", "1e999"), ("a", "{1, 2}", "{1, 2}"), ("a", "b'x'", "b'x'"),
    ("sn", "12", "12"), ("any_s", "12", "12"), ("e", "1", "1"), ("ei", "1", 1),
    ("a", "[" * 5000, "[" * 5000), ("i", "1" * 5000, "1" * 5000),  # parser limits: raw text
    ("unknown", "12", 12), ("unknown", "hello world", "hello world"),
])
def test_typed_arguments(key, raw, value):
    text = f"<tool_call>f\n<arg_key>{key}</arg_key>\n<arg_value>{raw}</arg_value>\n</tool_call>"
    content, calls = parse_tool_calls(text, TYPED, ids())
    assert content is None
    assert calls == [call("f", {key: value})]
    json.loads(calls[0]["function"]["arguments"])  # always valid JSON


def test_untyped_without_tools_and_flat_tool_dicts():
    text = render_call("g", {"s": "5"})  # renders as <arg_value>5</arg_value>
    assert parse_tool_calls(text, None, ids())[1] == [call("g", {"s": 5})]
    flat = [{"name": "g", "parameters": {"properties": {"s": {"type": "string"}}}}]
    assert parse_tool_calls(text, flat, ids())[1] == [call("g", {"s": "5"})]
    assert parse_tool_calls(text, [{"type": "function", "function": {"name": "g"}}], ids())[1] \
        == [call("g", {"s": 5})]


def test_truncated_tool_call_is_content():
    text = "Sure. <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_val"
    assert parse_tool_calls(text, WEATHER, ids()) == (text, [])
    done = render_call("now", {})
    text2 = f"A {done}\n<tool_call>get_weather\n"
    assert parse_tool_calls(text2, WEATHER, ids()) == ("A\n<tool_call>get_weather\n", [call("now")])
    for t in (text, text2, "<tool_call>", "x <tool_call", "x\n\n<tool_call>f</tool_call"):
        for cuts in ([], range(1, len(t))):
            assert_equivalent(t, cuts, WEATHER, thinking=False)


def test_tool_call_inside_reasoning_is_not_a_call():
    text = "<think>maybe <tool_call>f\n</tool_call></think>\nno call"
    assert parse_output(text, None) == ("maybe <tool_call>f\n</tool_call>", "no call", [])


def test_switches():
    text = "\n<think>r</think>\n" + render_call("f", {"i": 1})
    assert parse_output(text, TYPED, parse_reasoning=False, id_factory=ids()) == (
        None, "<think>r</think>", [call("f", {"i": 1})])
    assert parse_output(text, TYPED, parse_tools=False) == ("r", render_call("f", {"i": 1}), [])
    assert parse_output(text, None, parse_reasoning=False, parse_tools=False) == (None, text, [])
    for kw in ({"parse_reasoning": False}, {"parse_tools": False},
               {"parse_reasoning": False, "parse_tools": False}, {"thinking": False}):
        for cuts in ([], range(1, len(text))):
            assert_equivalent(text, cuts, TYPED, **kw)


def test_tool_stream_is_live_and_emits_whole_call_at_close():
    p = ToolCallStreamParser(WEATHER, ids())
    assert p.feed("Let me check") == [{"content": "Let me check"}]
    assert p.feed(" <tool") == []  # could be a tag; the space may be format
    assert p.feed("_call>get_weather\n<arg_key>city</arg_key>") == []
    assert p.feed("<arg_value>Oslo</arg_value></tool_call>\n\n") == [
        {"tool_calls": [{"index": 0, **call("get_weather", {"city": "Oslo"})}]}]
    assert p.feed("Done") == [{"content": "\nDone"}]
    assert p.feed(" <to then no tag") == [{"content": " <to then no tag"}]
    assert p.finish() == []
    q = ToolCallStreamParser(None)
    assert q.feed("x  ") == [{"content": "x"}] and q.finish() == [{"content": "  "}]


def test_deltas_in_one_chunk_keep_order():
    text = "<think>r</think>a" + render_call("f", {}) + "b" + render_call("g", {})
    _, deltas = stream(text)
    assert [next(iter(d)) for d in deltas] == [
        "reasoning_content", "content", "tool_calls", "content", "tool_calls"]
    assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == [0, 1]


def test_default_ids_are_random_hex():
    _, calls = parse_tool_calls(render_call("f", {}) + render_call("f", {}), None)
    a, b = (c["id"] for c in calls)
    assert a != b and a.startswith("call_") and int(a[5:], 16) >= 0


# ---------------------------------------------------------------- property tests

SAFE = "abdefmpqrsxyz0123456789 <>/\n\t\r\u3000=\"'{}[]:,.é中😀"  # cannot spell any of the tags
safe_text = st.text(SAFE, max_size=25)
ws = st.text(" \n\t\u3000", max_size=3)
ident = st.text("abdefmpqrsxyz_0123456789", min_size=1, max_size=8)
name = st.text("abdefmpqrsxyz_0123456789.-", min_size=1, max_size=10)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64),
                      st.floats(allow_nan=False, allow_infinity=False), safe_text)
json_val = st.recursive(json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(safe_text, c, max_size=3)), max_leaves=6)
KINDS = {
    "string": (st.just({"type": "string"}), safe_text),
    "integer": (st.just({"type": "integer"}), st.integers(-2**64, 2**64)),
    "number": (st.just({"type": "number"}), st.floats(allow_nan=False, allow_infinity=False)),
    "boolean": (st.just({"type": "boolean"}), st.booleans()),
    "null": (st.just({"type": "null"}), st.none()),
    "object": (st.just({"type": "object"}), st.dictionaries(safe_text, json_val, max_size=3)),
    "array": (st.just({"type": "array"}), st.lists(json_val, max_size=3)),
    "untyped": (st.none(), json_val.filter(lambda v: not isinstance(v, str))),
}


@st.composite
def tool_call_case(draw):
    """A rendered call, its expected (name, args) and the tool schema for it."""
    fname = draw(name)
    keys = draw(st.lists(ident, unique=True, max_size=4))
    props, args = {}, {}
    for k in keys:
        schema_s, value_s = KINDS[draw(st.sampled_from(sorted(KINDS)))]
        schema = draw(schema_s)
        if schema is not None:
            props[k] = schema
        args[k] = draw(value_s)
    rendered = render_call(fname, args, name_sep=draw(st.sampled_from(["\n", ""])),
                           kv_sep=draw(st.sampled_from(["\n", "", " \n "])))
    tool = {"type": "function", "function": {"name": fname, "parameters": {"type": "object",
                                                                            "properties": props}}}
    return rendered, (fname, args), tool


@st.composite
def glm_output(draw):
    """A well-formed GLM-4.5 output and the result the parser must give for it."""
    thinking = draw(st.booleans())
    calls = draw(st.lists(tool_call_case(), max_size=3, unique_by=lambda c: c[1][0]))
    pieces = draw(st.lists(safe_text, min_size=len(calls) + 1, max_size=len(calls) + 1))
    pieces = [draw(ws) + p + draw(ws) for p in pieces]
    body = "".join(p + c[0] for p, c in zip(pieces, calls)) + pieces[-1]
    if calls and draw(st.booleans()):  # append a call cut off by max_tokens
        rendered = calls[-1][0]
        truncated = rendered[:draw(st.integers(len("<tool_call>"), len(rendered) - 1))]
        body, pieces[-1] = body + truncated, pieces[-1] + truncated
    joined = [p.lstrip() for p in pieces[:-1]]
    joined = [p.rstrip() for p in joined] + [pieces[-1].lstrip()]
    content = "\n".join(p for p in joined if p) or None
    reasoning = None
    if thinking and draw(st.integers(0, 3)):
        r = draw(safe_text)
        if draw(st.booleans()):  # cut off inside the think block
            text, reasoning, content, calls = draw(ws) + "<think>" + r, r or None, None, []
        else:
            text, reasoning = draw(ws) + "<think>" + r + "</think>" + draw(ws) + body, r or None
    else:
        text = body
    tools = [c[2] for c in calls]
    expected_calls = [call(n, a, f"call_{i}") for i, (_, (n, a), _) in enumerate(calls)]
    return text, thinking, tools, (reasoning, content, expected_calls)


@st.composite
def cuts_for(draw, text):
    n = len(text)
    return draw(st.one_of(st.just([]), st.just(list(range(1, n + 1))),
                          st.lists(st.integers(0, n), max_size=12)))


@PROPERTY
@given(st.data())
def test_property_generated_outputs(data):
    text, thinking, tools, expected = data.draw(glm_output())
    assert parse_output(text, tools, thinking, id_factory=ids()) == expected
    cuts = data.draw(cuts_for(text))
    assert stream(text, cuts, tools, thinking=thinking)[0] == expected


ATOMS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
         "<arg_value>", "</arg_value>", "<", "</", "<t", "<th", "</th", "<tool_", "</tool_call",
         "<arg_", "\n", " ", "\t", "f", "s", "i", "x", "name", "1", "2.5", "true", "None", "{'a': 1}",
         '{"b": [1]}', "[1,", "é", "中", "><", "/>", "think>", "tool_call>"]


@st.composite
def chaos_text(draw):
    """Arbitrary text: tag soup, or a well-formed output with atoms spliced in / spans cut out."""
    if draw(st.booleans()):
        return "".join(draw(st.lists(st.one_of(st.sampled_from(ATOMS), safe_text), max_size=30)))
    text = draw(glm_output())[0]
    for _ in range(draw(st.integers(0, 4))):
        i, j = sorted(draw(st.lists(st.integers(0, len(text)), min_size=2, max_size=2)))
        if draw(st.booleans()):
            text = text[:i] + draw(st.sampled_from(ATOMS)) + text[i:]
        else:
            text = text[:i] + text[j:]
    return text


@PROPERTY
@given(st.data())
def test_property_stream_equals_nonstream_on_any_text(data):
    text = data.draw(chaos_text())
    cuts = data.draw(cuts_for(text))
    thinking, pr, pt = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans())
    assert_equivalent(text, cuts, TYPED, thinking=thinking, parse_reasoning=pr, parse_tools=pt)
    # each parser on its own
    p = ReasoningStreamParser(thinking)
    parts = [p.feed(c) for c in chunk(text, cuts)] + [p.finish()]
    assert (
        "".join(d.get("reasoning_content", "") for d in parts) or None,
        "".join(d.get("content", "") for d in parts) or None,
    ) == parse_reasoning(text, thinking)
    q = ToolCallStreamParser(TYPED, ids())
    deltas = [d for c in chunk(text, cuts) for d in q.feed(c)] + q.finish()
    _, content, calls = merge_deltas(deltas)
    assert (content, calls) == parse_tool_calls(text, TYPED, ids())
    for c in calls:
        json.loads(c["function"]["arguments"])
