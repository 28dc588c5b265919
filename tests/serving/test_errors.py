"""Bad requests: OpenAI's error shape and status, never a 500, never reaching the engine."""

import httpx
import openai
import pytest
from conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME
from serving_script import WEATHER_TOOL

USER = [{"role": "user", "content": "hi"}]


def _chat(http, status, **body):
    response = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": USER, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body,param", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
])  # fmt: skip
def test_invalid_parameters_are_400(http, body, param):
    error = _chat(http, 400, **body)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_malformed_json_is_400_not_422(http):
    for content in (b'{"messages": [', b"not json", b"[1, 2]", b""):
        response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (content, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context(client, http):
    messages = [{"role": "user", "content": "hello " * 3000}]
    num_tokens = http.post("/tokenize", json={"messages": messages}).json()["count"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=messages)
    message = e.value.body["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message and f"{num_tokens} input tokens" in message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=[1] * (MAX_MODEL_LEN + 5))


def test_bad_completion_prompts(client):
    for prompt in ([10**7], [], ""):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL_NAME, prompt=prompt)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=USER)


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_tokenize_errors(http):
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [-1]}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [10**8]}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
