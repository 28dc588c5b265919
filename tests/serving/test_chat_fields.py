"""Chat fields that peers accept and glmserve once ignored: each works as in vLLM (or SGLang), or is a clear 400.
Also /v1/models/{id} and /version."""

import importlib.metadata

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL_NAME
from serving_script import TIME_TOOL, WEATHER_TOOL
from test_chat import chat, comparable, streamed, user, whole


def both(client, marker, **kwargs):
    """(whole, reassembled stream) as (reasoning, content, calls, finish_reason)."""
    response = chat(client, user(marker), **kwargs)
    stream, _ = streamed(client, user(marker), **kwargs)
    return whole(response.choices[0]), comparable(stream[0])


def test_include_reasoning_false_leaves_the_reasoning_out(client):
    got, stream = both(client, "SCRIPT_HELLO", extra_body={"include_reasoning": False})
    assert got == stream == (None, "Hello there! How can I help?", [], "stop")


def test_separate_reasoning_false_leaves_it_in_the_content(client):
    got, stream = both(client, "SCRIPT_HELLO", extra_body={"separate_reasoning": False})
    reasoning, content, _, _ = got
    assert got == stream and reasoning is None
    assert "Greet them." in content and content.endswith("Hello there! How can I help?")


def test_parallel_tool_calls_false_returns_the_first_call(client):
    kwargs = dict(tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False, extra_body={"enable_thinking": False})
    got, stream = both(client, "SCRIPT_TWO_CALLS", **kwargs)
    assert got == stream
    assert got[2] == [{"name": "get_weather", "arguments": '{"location": "Paris"}'}] and got[3] == "tool_calls"


def test_continuous_usage_stats_in_every_chunk(client):
    chunks = list(chat(client, user("SCRIPT_HELLO"), stream=True,
                       stream_options={"include_usage": True, "continuous_usage_stats": True}))
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    produced = [u.completion_tokens for u in usages]
    assert produced == sorted(produced) and produced[-1] == chunks[-1].usage.completion_tokens > 0
    assert {u.prompt_tokens for u in usages} == {usages[-1].prompt_tokens}
    plain = list(chat(client, user("SCRIPT_HELLO"), stream=True))
    assert all(c.usage is None for c in plain)


def test_continuous_usage_stats_on_completions(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    produced = [c.usage.completion_tokens for c in chunks if c.choices]  # steps may arrive together
    assert produced == sorted(set(produced)) and produced[-1] == 4


@pytest.mark.parametrize("body,param,words", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "send tools"),
    ({"function_call": "auto"}, "function_call", "send tools"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                {"type": "image_url", "image_url": {"url": "data:x"}}]}]},
     "messages", "image_url content parts are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages",
     "input_audio"),
])  # fmt: skip
def test_unsupported_fields_are_a_clear_400(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_NAME, **{"messages": user("hi"), **body})
    error = raised.value.body
    assert error["param"] == param and words in error["message"], error


def test_model_by_id_and_version(client, server):
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(f"{server.url}/v1/models/{MODEL_NAME}").status_code == 401  # behind the key, as /v1/models
    version = httpx.get(f"{server.url}/version").json()["version"]
    assert version == importlib.metadata.version("glmserve")
    assert httpx.get(f"{server.url}/version", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
