"""OpenAI's Responses API through the official `openai` client: input strings and items, instructions, function
tools and calls, reasoning items, reasoning.effort, max_output_tokens, streamed and not (the stream's items and
final response equal the whole response), errors in OpenAI's shape."""

import json

import openai
import pytest
from conftest import MODEL_NAME, metric
from serving_script import SCRIPT, TIME_TOOL, WEATHER_TOOL


def _function(tool):
    return {"type": "function", **tool["function"]}


WEATHER, TIME = _function(WEATHER_TOOL), _function(TIME_TOOL)
NO_THINKING = {"effort": "none"}


def create(client, input, **kwargs):
    return client.responses.create(model=MODEL_NAME, input=input, **kwargs)


def reasoning(text):
    return {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def message(text):
    return {"type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call(name, arguments):
    return {"type": "function_call", "name": name, "arguments": json.dumps(arguments, ensure_ascii=False),
            "status": "completed"}


def items(output):
    """Output items without their ids (fresh per response); a call's call_id is checked and dropped too."""
    found = []
    for item in output:
        item = item if isinstance(item, dict) else item.model_dump(exclude_none=True)
        item = {k: v for k, v in item.items() if k != "id"}
        if item["type"] == "function_call":
            assert item.pop("call_id").startswith("call_")
        found.append(item)
    return found


CASES = [
    # (input, request extras, expected output items)
    ("SCRIPT_HELLO", {}, [reasoning("Greet them."), message("Hello there! How can I help?")]),
    ("SCRIPT_SWITCH", {"reasoning": NO_THINKING}, [message("Direct answer.")]),
    ("SCRIPT_SWITCH", {"reasoning": {"effort": "high"}},
     [reasoning("Thinking it over."), message("Considered answer.")]),
    ("SCRIPT_TOOL", {"tools": [WEATHER]},
     [reasoning("Need the weather."), call("get_weather", {"location": "北京", "days": 3})]),
    ("SCRIPT_TWO_CALLS", {"tools": [WEATHER, TIME], "reasoning": NO_THINKING},
     [message("Let me check both."), call("get_weather", {"location": "Paris"}), call("get_time", {})]),
    ("SCRIPT_TWO_CALLS", {"tools": [WEATHER, TIME], "reasoning": NO_THINKING, "parallel_tool_calls": False},
     [message("Let me check both."), call("get_weather", {"location": "Paris"})]),
    ("SCRIPT_REQUIRED", {"tools": [WEATHER, TIME], "tool_choice": "required"},
     [call("get_weather", {"location": "Rome"})]),
    ("SCRIPT_NAMED", {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "name": "get_time"}},
     [call("get_time", {})]),
    ("SCRIPT_RAW_TOOL", {"tools": [WEATHER], "tool_choice": "none"},
     [message("Calling: <tool_call>get_weather\n</tool_call>")]),
    ([{"role": "user", "content": [{"type": "input_text", "text": "SCRIPT_HELLO"}]}],
     {"instructions": "Be brief.", "temperature": 0.5, "top_p": 0.9, "store": False, "metadata": {"k": "v"}},
     [reasoning("Greet them."), message("Hello there! How can I help?")]),
]


def _streamed(client, input, **kwargs):
    """The stream's events reassembled into items (from the deltas alone), and the SDK's final response."""
    built, kinds = {}, []
    with client.responses.stream(model=MODEL_NAME, input=input, **kwargs) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_item.added":
                built[event.output_index] = event.item.model_dump(exclude_none=True)
            elif event.type == "response.content_part.added":
                built[event.output_index]["content"].append(event.part.model_dump(exclude_none=True))
            elif event.type in ("response.reasoning_text.delta", "response.output_text.delta"):
                built[event.output_index]["content"][event.content_index]["text"] += event.delta
            elif event.type == "response.function_call_arguments.delta":
                built[event.output_index]["arguments"] += event.delta
            elif event.type == "response.output_item.done":
                built[event.output_index]["status"] = event.item.status
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    return [built[i] for i in sorted(built)], final


@pytest.mark.parametrize("input,extra,expected", CASES, ids=[f"{c[0]}-{i}" if isinstance(c[0], str) else f"items-{i}"
                                                              for i, c in enumerate(CASES)])
def test_stream_and_whole_agree_with_the_script(client, input, extra, expected):
    response = create(client, input, **extra)
    assert items(response.output) == expected
    assert response.status == "completed" and response.store is False and response.model == MODEL_NAME
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    built, final = _streamed(client, input, **extra)
    assert items(built) == expected
    assert [i.id for i in final.output] == [i["id"] for i in built]
    whole, accumulated = response.model_dump(), final.model_dump()
    for r in (whole, accumulated):
        for key in ("id", "created_at", "output", "usage"):
            r.pop(key)
    assert accumulated == whole
    assert final.usage.output_tokens == response.usage.output_tokens


def test_function_call_round_trip(client, http):
    """The client's loop: the output items sent back with a function_call_output; the model sees GLM's history."""
    first = create(client, "SCRIPT_TOOL", tools=[WEATHER])
    (fc,) = [i for i in first.output if i.type == "function_call"]
    follow_up = [{"role": "user", "content": "SCRIPT_TOOL"}, *[i.model_dump(exclude_none=True) for i in first.output],
                 {"type": "function_call_output", "call_id": fc.call_id, "output": '{"weather": "sunny"}'}]
    assert create(client, follow_up, tools=[WEATHER]).output


def test_max_output_tokens_makes_it_incomplete(client):
    response = create(client, "SCRIPT_LONG_THOUGHT", max_output_tokens=6)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (item,) = response.output
    thought = SCRIPT["SCRIPT_LONG_THOUGHT"].split("<think>")[1]
    assert item.type == "reasoning" and thought.startswith(item.content[0].text)
    assert response.usage.output_tokens == 6


def test_output_text_and_reasoning_tokens(client):
    response = create(client, "SCRIPT_HELLO")
    assert response.output_text == "Hello there! How can I help?"
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens


def _error(http, status, **body):
    response = http.post("/v1/responses", json={"model": MODEL_NAME, "input": "hi", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning"),
])  # fmt: skip
def test_bad_requests_get_openais_error_shape(http, body, param):
    error = _error(http, 400, **body)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_previous_response_id_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
        create(client, "hi", previous_response_id="resp_123")
    assert _error_status(client) == 404


def _error_status(client):
    try:
        client.responses.create(model="nope", input="hi")
    except openai.NotFoundError as e:
        return e.status_code


def test_metrics_count_responses(client, http):
    name = 'glmserve:requests_total{api="responses"}'
    before = metric(http.get("/metrics").text, name, default=0.0)
    create(client, "SCRIPT_HELLO")
    assert metric(http.get("/metrics").text, name) == before + 1

