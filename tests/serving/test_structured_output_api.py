"""Structured output over HTTP with the official `openai` client, on the embedded glm-4.5-nano (MTP on) and on a
random-weight checkpoint: JSON schemas, the other constraint kinds, tool calls held to their schemas in GLM-4.5's
own syntax, and the 400s for what is not supported."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from glmserve.serving.templates import glm45_chat_template
from glmserve.testing.checkpoint import write_random_checkpoint
from glmserve.testing.server import start_server
from glmserve.testing.structured_cases import JSON_SCHEMAS, random_tools

FLAGS = ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45", "--max-model-len", "2048"]
MTP = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
       "--speculative-num-draft-tokens", "4"]


@pytest.fixture(scope="module", params=["embedded", "random"])
def client(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        args = [*FLAGS, *MTP]
    else:
        checkpoint = write_random_checkpoint(tmp / "ckpt", "air", chat_template=glm45_chat_template())
        args = [str(checkpoint), *FLAGS, "--num-kv-blocks", "512"]
    server = start_server(args, tmp / "server.log")
    yield request.param, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    server.stop()


def _chat(client, stream: bool, **kwargs):
    """(reasoning, content, [(name, arguments)], finish_reason), streamed or not."""
    kwargs = {"model": client.models.list().data[0].id, "temperature": 0, "max_tokens": 300, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        m = choice.message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return (m.model_extra or {}).get("reasoning_content"), m.content, calls, choice.finish_reason
    reasoning, content, calls, finish = "", "", [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += [(c.function.name, c.function.arguments) for c in delta.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return reasoning or None, content or None, calls, finish


def _parallel(fn, items):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))


def _schema_cases(model: str, every_mode: bool) -> list[tuple]:
    """(schema, stream, thinking): every schema in each mode, or (the default suite) each schema in one mode, the
    modes taken in turn. Random weights never write </think>: thinking stays off for them."""
    thinkings = (False, True) if model == "embedded" else (False,)
    modes = [(stream, thinking) for stream in (False, True) for thinking in thinkings]
    if every_mode:
        return [(schema, *mode) for schema in JSON_SCHEMAS for mode in modes]
    return [(schema, *modes[i % len(modes)]) for i, schema in enumerate(JSON_SCHEMAS)]


@pytest.mark.parametrize("every_mode", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_json_schemas_validate_streamed_or_not_thinking_on_or_off(client, every_mode):
    model, c = client
    cases = _schema_cases(model, every_mode)

    def run(case):
        schema, stream, thinking = case
        return _chat(c, stream, messages=[{"role": "user", "content": "Give me an example record as JSON."}],
                     response_format={"type": "json_schema", "json_schema": {"name": "record", "schema": schema}},
                     extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})

    ended = 0
    for (schema, _, thinking), (reasoning, content, _, finish) in zip(cases, _parallel(run, cases)):
        # A grammar cannot make a model end a free string: random weights repeat themselves inside one until
        # max_tokens. Every output that ends is valid; the embedded model, trained on JSON answers, ends every one.
        if finish == "stop":
            ended += 1
            jsonschema.validate(json.loads(content), schema)
        if model == "embedded":
            assert (reasoning is not None) == thinking
    assert ended == len(cases) if model == "embedded" else ended >= 0.75 * len(cases), (ended, len(cases))


def test_choice_regex_grammar_and_json_object(client):
    _, c = client
    ask = {"messages": [{"role": "user", "content": "Answer."}], "max_tokens": 60,
           "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    _, content, _, _ = _chat(c, False, **{**ask, "extra_body": {**ask["extra_body"],
                                                                 "structured_outputs": {"choice": ["up", "down"]}}})
    assert content in ("up", "down")
    _, content, _, _ = _chat(c, True, **{**ask, "extra_body": {**ask["extra_body"], "guided_regex": r"\d{3}-[a-z]{2}"}})
    assert re.fullmatch(r"\d{3}-[a-z]{2}", content)
    _, content, _, _ = _chat(c, False, **{**ask, "extra_body": {**ask["extra_body"],
                                                                 "ebnf": 'root ::= ("ab" | "cd"){1,3} "!"'}})
    assert re.fullmatch(r"(ab|cd){1,3}!", content)
    text = c.completions.create(model=c.models.list().data[0].id, prompt="Phone:", max_tokens=20, temperature=0,
                                extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{4}"}}).choices[0].text
    assert re.fullmatch(r"\(\d{3}\) \d{4}", text)
    _, content, _, finish = _chat(c, False, response_format={"type": "json_object"}, **ask)
    if finish == "stop":
        assert isinstance(json.loads(content), (dict, list))


def _check_calls(tools, calls, finish, named=None):
    assert calls and finish in ("tool_calls", "length")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for name, arguments in calls:
        assert name in schemas and (named is None or name == named)
        jsonschema.validate(json.loads(arguments), schemas[name])


@pytest.mark.parametrize("choice", ["required", "named", "strict"])
def test_tool_calls_held_to_their_schemas(client, choice):
    """Generated tools (random names, keys, types, enums, nested objects): every call names a listed function
    and its arguments validate, after the parser's type conversion; streaming equals non-streaming."""
    model, c = client

    def run(seed):
        tools = random_tools(seed)
        kwargs = {"messages": [{"role": "user", "content": "Use one of the tools, please."}], "tools": tools}
        if choice == "named":
            kwargs["tool_choice"] = {"type": "function", "function": {"name": tools[1]["function"]["name"]}}
        elif choice == "required":
            kwargs["tool_choice"] = "required"
        else:
            for t in tools:
                t["function"]["strict"] = True
        return tools, _chat(c, False, **kwargs), _chat(c, True, **kwargs)

    num_cut = 0
    for tools, plain, streamed in _parallel(run, range(10)):
        reasoning, content, calls, finish = plain
        assert (reasoning, content or None, calls, finish) == streamed  # a whole empty answer is "", not null
        named = tools[1]["function"]["name"] if choice == "named" else None
        if choice == "strict" and not calls:  # auto: the model may answer in words (or ramble to max_tokens)
            assert finish == "length" or "<tool_call>" not in (content or "")
            continue
        if finish == "length":  # a free string value run to max_tokens (random weights; the nano model once)
            assert choice == "strict" or not content  # a forced call cut off is no raw markup
            num_cut += 1
            if calls:  # the calls it closed before
                _check_calls(tools, calls, finish, named)
            continue
        _check_calls(tools, calls, finish, named)
        assert not content or "<tool_call>" not in content
    # Random weights may also go on calling (parallel_tool_calls) until max_tokens.
    assert model == "random" or num_cut <= 3


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, "'not'"),
    ({"response_format": {"type": "yaml"}}, "not supported"),
    ({"guided_grammar": "root ::= "}, "does not compile"),
    ({"guided_regex": "[a-"}, "does not compile"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " *", "regex": "a"}}, "whitespace_pattern"),
    ({"guided_regex": "a", "regex": "b"}, "not several"),
    ({"guided_json": "{not json"}, "not valid JSON"),
])
def test_unsupported_constraints_are_400(client, body, message):
    model, c = client
    if model == "random":
        pytest.skip("the server's answer does not depend on the model")
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "x"}],
                                  extra_body=body)


USER_TOOLS = [  # names and keys of the user's own, not the embedded model's corpus's
    {"type": "function", "function": {"name": "weather_lookup", "description": "Get the weather forecast for a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "cityName": {"type": "string"},
                                          "numDays": {"type": "integer", "minimum": 1, "maximum": 7}},
                                          "required": ["cityName"]}}},
    {"type": "function", "function": {"name": "convert_money", "description": "Convert an amount between currencies.",
                                      "parameters": {"type": "object", "properties": {
                                          "amt": {"type": "number"}, "src": {"enum": ["USD", "EUR", "JPY"]},
                                          "dst": {"enum": ["USD", "EUR", "JPY"]}}, "required": ["amt", "src", "dst"]}}},
]
USER_QUESTIONS = ["What's the weather in Paris for the next 3 days?", "Convert 100 USD to EUR please.",
                  "How is the weather in Tokyo tomorrow?", "Weather forecast for Berlin, 5 days."]


def test_strict_user_tools_under_auto_on_the_embedded_model(client):
    """The issue's case: on tools a user writes, the nano model unconstrained calls unlisted names with keys from
    its corpus (`check_weather_weather({"city": ...})`); declared strict, what it calls is listed and valid."""
    model, c = client
    if model == "random":
        pytest.skip("random weights hardly ever open a call under auto")
    tools = [{**t, "function": {**t["function"], "strict": True}} for t in USER_TOOLS]
    results = _parallel(lambda q: _chat(c, False, messages=[{"role": "user", "content": q}], tools=tools,
                                        max_tokens=200), USER_QUESTIONS)
    called = [r for r in results if r[2]]
    assert called  # the model does call (Berlin, at least)
    for _, _, calls, finish in called:
        _check_calls(tools, calls, finish)
