"""Anthropic's Messages API through the official `anthropic` client: every request field, streamed and not (the
stream's accumulated message equals the whole one), errors in Anthropic's shape, auth by x-api-key, token counts
equal to the same conversation's in OpenAI's shape."""

import json

import anthropic
import httpx
import pytest
from conftest import API_KEY, MODEL_NAME, metric
from serving_script import SCRIPT, TIME_TOOL, WEATHER_TOOL


def _anthropic_tool(tool):
    f = tool["function"]
    return {"name": f["name"], **({"description": f["description"]} if "description" in f else {}),
            "input_schema": f["parameters"]}


WEATHER, TIME = _anthropic_tool(WEATHER_TOOL), _anthropic_tool(TIME_TOOL)
NO_THINKING = {"type": "disabled"}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def create(claude, messages, **kwargs):
    kwargs.setdefault("max_tokens", 256)
    return claude.messages.create(model=MODEL_NAME, messages=messages, **kwargs)


def streamed(claude, messages, **kwargs):
    kwargs.setdefault("max_tokens", 256)
    with claude.messages.stream(model=MODEL_NAME, messages=messages, **kwargs) as stream:
        return stream.get_final_message()


def blocks(message):
    return [b.to_dict() for b in message.content]


def thinking(text):
    return {"type": "thinking", "thinking": text, "signature": ""}


def text(t):
    return {"type": "text", "text": t}


def tool_use(name, input):
    return {"type": "tool_use", "name": name, "input": input}


CASES = [
    # (marker, request extras, expected blocks (tool_use without id), stop_reason)
    ("SCRIPT_HELLO", {}, [thinking("Greet them."), text("Hello there! How can I help?")], "end_turn"),
    ("SCRIPT_SWITCH", {"thinking": {"type": "enabled", "budget_tokens": 1024}},
     [thinking("Thinking it over."), text("Considered answer.")], "end_turn"),
    ("SCRIPT_SWITCH", {"thinking": NO_THINKING}, [text("Direct answer.")], "end_turn"),
    ("SCRIPT_TOOL", {"tools": [WEATHER]},
     [thinking("Need the weather."), tool_use("get_weather", {"location": "北京", "days": 3})], "tool_use"),
    ("SCRIPT_TWO_CALLS", {"tools": [WEATHER, TIME], "thinking": NO_THINKING},
     [text("Let me check both."), tool_use("get_weather", {"location": "Paris"}), tool_use("get_time", {})],
     "tool_use"),
    ("SCRIPT_TWO_CALLS", {"tools": [WEATHER, TIME], "thinking": NO_THINKING,
                          "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
     [text("Let me check both."), tool_use("get_weather", {"location": "Paris"})], "tool_use"),
    ("SCRIPT_REQUIRED", {"tools": [WEATHER, TIME], "tool_choice": {"type": "any"}},
     [tool_use("get_weather", {"location": "Rome"})], "tool_use"),
    ("SCRIPT_REQUIRED", {"tools": [WEATHER], "tool_choice": {"type": "any"}, "thinking": NO_THINKING},
     [tool_use("get_weather", {"location": "Oslo"})], "tool_use"),
    ("SCRIPT_NAMED", {"tools": [WEATHER, TIME], "tool_choice": {"type": "tool", "name": "get_time"}},
     [tool_use("get_time", {})], "tool_use"),
    ("SCRIPT_RAW_TOOL", {"tools": [WEATHER], "tool_choice": {"type": "none"}},
     [text("Calling: <tool_call>get_weather\n</tool_call>")], "end_turn"),
    ("SCRIPT_HELLO", {"system": "Be brief.", "metadata": {"user_id": "u-1"},
                      "extra_body": {"temperature": 0.5, "top_p": 0.9, "top_k": 20}},
     [thinking("Greet them."), text("Hello there! How can I help?")], "end_turn"),
    ("SCRIPT_HELLO", {"system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Be kind."}]},
     [thinking("Greet them."), text("Hello there! How can I help?")], "end_turn"),
]


def _without_ids(content):
    for block in content:
        if block["type"] == "tool_use":
            assert block.pop("id").startswith("toolu_")
    return content


@pytest.mark.parametrize("marker,extra,expected,stop_reason", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_stream_and_whole_agree_with_the_script(claude, marker, extra, expected, stop_reason):
    message = create(claude, user(marker), **extra)
    assert _without_ids(blocks(message)) == expected
    assert message.stop_reason == stop_reason and message.stop_sequence is None
    assert message.model == MODEL_NAME and message.role == "assistant" and message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    final = streamed(claude, user(marker), **extra)
    whole, accumulated = message.to_dict(), final.to_dict()
    for m in (whole, accumulated):
        m.pop("id")
        _without_ids(m["content"])
    assert accumulated == whole


def test_stop_sequence_and_max_tokens(claude):
    message = create(claude, user("SCRIPT_STOP"), stop_sequences=["STOP"], thinking=NO_THINKING)
    assert blocks(message) == [text("alpha beta ")]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    final = streamed(claude, user("SCRIPT_STOP"), stop_sequences=["STOP"], thinking=NO_THINKING)
    assert (blocks(final), final.stop_reason, final.stop_sequence) == ([text("alpha beta ")], "stop_sequence", "STOP")
    cut = create(claude, user("SCRIPT_LONG_THOUGHT"), max_tokens=6)
    thought = SCRIPT["SCRIPT_LONG_THOUGHT"].split("<think>")[1]
    (block,) = cut.content
    assert block.type == "thinking" and thought.startswith(block.thinking) and cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 6
    assert streamed(claude, user("SCRIPT_LONG_THOUGHT"), max_tokens=6).content == cut.content


def test_event_sequence(server):
    """The raw stream: message_start, ping, each block's start/delta/stop, message_delta, message_stop."""
    body = {"model": MODEL_NAME, "max_tokens": 64, "stream": True, "tools": [WEATHER],
            "messages": user("SCRIPT_TOOL")}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": API_KEY}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    collapsed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert collapsed == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                         "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                         "message_stop"]
    assert datas[names.index("message_delta")]["delta"]["stop_reason"] == "tool_use"
    deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"thinking_delta", "input_json_delta"}


def test_tool_result_round_trip_renders_glm_history(claude, http):
    """The client's tool loop: the tool_use answer sent back with a tool_result renders the same prompt as the same
    conversation in OpenAI's shape (count_tokens and /tokenize), and is answered."""
    first = create(claude, user("SCRIPT_TOOL"), tools=[WEATHER])
    call = first.content[-1]
    messages = user("SCRIPT_TOOL") + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": '{"weather": "sunny"}'},
                                     {"type": "text", "text": "Thanks."}]}]
    counted = claude.messages.count_tokens(model=MODEL_NAME, messages=messages, tools=[WEATHER],
                                           system="You help.").input_tokens
    openai_messages = [
        {"role": "system", "content": "You help."}, *user("SCRIPT_TOOL"),
        {"role": "assistant", "content": "", "reasoning_content": "Need the weather.", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(call.input, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'},
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]
    tokenized = http.post("/tokenize", json={"messages": openai_messages, "tools": [WEATHER_TOOL]}).json()
    assert counted == tokenized["count"]
    prompt = http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert '<tool_response>\n{"weather": "sunny"}\n</tool_response><|user|>\nThanks.<|assistant|>' in prompt
    assert create(claude, messages, tools=[WEATHER], system="You help.").content


def test_x_api_key_beta_query_and_unknown_beta_headers(server):
    """The SDK's beta client sends ?beta=true and an anthropic-beta header; Bearer auth works as well."""
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    message = claude.beta.messages.create(model=MODEL_NAME, max_tokens=32, messages=user("SCRIPT_HELLO"),
                                          betas=["interleaved-thinking-2025-05-14", "made-up-beta-2099-01-01"])
    assert message.content[-1].text == "Hello there! How can I help?"
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=API_KEY, max_retries=0)
    assert bearer.messages.create(model=MODEL_NAME, max_tokens=32, messages=user("SCRIPT_HELLO")).content
    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL_NAME, max_tokens=8, messages=user("hi"))
    assert raised.value.body["error"]["type"] == "authentication_error"
    unauthenticated = httpx.post(server.url + "/v1/messages/count_tokens", json=BASE)
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["type"] == "authentication_error"


def _post(server, body, status, path="/v1/messages"):
    response = httpx.post(server.url + path, json=body, headers={"x-api-key": API_KEY}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"} and error["error"]["message"]
    return error["error"]


BASE = {"model": MODEL_NAME, "max_tokens": 8, "messages": user("hi")}


@pytest.mark.parametrize("change,word", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]},
     "image"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "tool_use"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]}]}]}, "tool_result"),
    ({"messages": [*user("hi"), {"role": "assistant", "content": "The answer is"}]}, "prefill"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"thinking": {"type": "sometimes"}}, "thinking"),
    ({"stop_sequences": [""]}, "stop_sequences"),
])  # fmt: skip
def test_bad_requests_get_anthropics_error_shape(server, change, word):
    body = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    error = _post(server, body, 400)
    assert error["type"] == "invalid_request_error" and word in error["message"], error


def test_missing_max_tokens_is_400_through_the_client(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as raised:  # the SDK's create() refuses to send it without
        claude.post("/v1/messages", cast_to=anthropic.types.Message, body={"model": MODEL_NAME, "messages": user("hi")})
    assert raised.value.status_code == 400 and "max_tokens" in raised.value.body["error"]["message"]


def test_other_statuses_in_anthropics_shape(server):
    assert _post(server, {**BASE, "model": "claude-nope"}, 404)["type"] == "not_found_error"
    assert _post(server, {**BASE, "model": "claude-nope"}, 404, "/v1/messages/count_tokens")["type"] == \
        "not_found_error"
    response = httpx.post(server.url + "/v1/messages", content=b"{not json", headers={"x-api-key": API_KEY})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    too_large = httpx.post(server.url + "/v1/messages", content=b" " * (17 * 2**20), headers={"x-api-key": API_KEY})
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "request_too_large"
    # The OpenAI routes keep OpenAI's shape.
    openai_error = httpx.post(server.url + "/v1/chat/completions", json={"messages": []},
                              headers={"x-api-key": API_KEY}).json()["error"]
    assert set(openai_error) == {"message", "type", "param", "code"}


def test_metrics_count_requests_per_api(claude, http):
    before = http.get("/metrics").text
    create(claude, user("SCRIPT_HELLO"))
    http.post("/v1/chat/completions", json={"messages": user("SCRIPT_HELLO")})
    after = http.get("/metrics").text
    for api in ("anthropic", "chat"):
        name = f'glmserve:requests_total{{api="{api}"}}'
        assert metric(after, name) == metric(before, name, default=0.0) + 1
