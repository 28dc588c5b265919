"""Completions, models, tokenize/detokenize, health, metrics, and aborting on client disconnect."""

import json
import time

import httpx
import pytest
from conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, metric


def test_models(client):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME and card.owned_by == "glmserve"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_health_needs_no_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_text_and_token_prompts(client, http):
    ids = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    kwargs = dict(model=MODEL_NAME, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt="The quick brown fox", **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    stream = client.completions.create(prompt=ids, stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_ids.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_return_token_ids(client, http):
    """vLLM's return_token_ids: the prompt's and the output's token ids, whole and streamed."""
    ids = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    kwargs = dict(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    (choice,) = client.completions.create(**kwargs).choices
    assert choice.model_extra["prompt_token_ids"] == ids and len(choice.model_extra["token_ids"]) == 6
    text = http.post("/detokenize", json={"tokens": choice.model_extra["token_ids"]}).json()["prompt"]
    assert text == choice.text
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].model_extra["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    assert [t for c in chunks for t in c.model_extra["token_ids"]] == choice.model_extra["token_ids"]
    (plain,) = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2).choices
    assert plain.model_extra.get("token_ids") is None


def test_completion_batch_n_and_logprobs(client):
    response = client.completions.create(model=MODEL_NAME, prompt=["Hello", "The model"], n=2, max_tokens=4,
                                         logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 16
    for choice in response.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
        assert lp.text_offset[0] == 0


def test_completion_stop_string(client):
    response = client.completions.create(model=MODEL_NAME, prompt="SCRIPT_STOP", stop=["gamma"], max_tokens=20)
    assert response.choices[0].text == "alpha beta STOP "
    assert response.choices[0].finish_reason == "stop"


def test_tokenize_and_detokenize(http):
    messages = [{"role": "user", "content": "hi"}]
    body = http.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False},
                                        "return_token_strs": True}).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert len(body["token_strs"]) == body["count"]
    text = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text == "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = http.post("/tokenize", json={"messages": messages, "tools": tools}).json()["tokens"]
    rendered = http.post("/detokenize", json={"tokens": with_tools}).json()["prompt"]
    assert '<tools>\n{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools>' \
        in rendered
    ids = http.post("/tokenize", json={"prompt": "hi <think>"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "hi <think>"


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def test_metrics(server, client):
    # Longer than a KV block, so that the second time it is found in the prefix cache.
    messages = [{"role": "user", "content": "SCRIPT_HELLO, and please be kind to everybody who reads this."}]
    before = _metrics(server)
    client.chat.completions.create(model=MODEL_NAME, messages=messages)
    after = _metrics(server)
    assert metric(after, "glmserve:request_success_total") == metric(before, "glmserve:request_success_total") + 1
    assert metric(after, "glmserve:generation_tokens_total") > metric(before, "glmserve:generation_tokens_total")
    assert metric(after, "glmserve:prompt_tokens_total") > metric(before, "glmserve:prompt_tokens_total")
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert metric(after, f"glmserve:{name}_count") == metric(before, f"glmserve:{name}_count") + 1
    assert metric(after, "glmserve:num_requests_running") == 0
    assert metric(after, "glmserve:num_requests_waiting") == 0
    assert metric(after, "glmserve:kv_cache_usage_perc") == 0
    # The pool's configuration, as vLLM's cache_config_info: 256 blocks of 16 tokens in the compute dtype.
    assert ('glmserve:cache_config_info{block_size="16",cache_dtype="float32",num_gpu_blocks="256",'
            'num_tokens="4096"} 1.0') in after
    client.chat.completions.create(model=MODEL_NAME, messages=messages)
    again = _metrics(server)
    assert metric(again, "glmserve:prefix_cache_hits_total") > metric(after, "glmserve:prefix_cache_hits_total")
    assert 0 < metric(again, "glmserve:prefix_cache_hit_rate") <= 1


def _wait_idle(server, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _metrics(server)
        if metric(text, "glmserve:num_requests_running") == 0 and metric(text, "glmserve:kv_cache_usage_perc") == 0:
            return text
        time.sleep(0.05)
    pytest.fail(f"the engine did not go idle:\n{text}")


LONG = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _aborted(text: str) -> float:
    return metric(text, 'glmserve:request_success_total{finished_reason="abort"}', default=0.0)


def test_streaming_disconnect_aborts_and_frees_blocks(server):
    aborted = _aborted(_wait_idle(server))
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=HEADERS,
                      timeout=30) as response:
        events = (line for line in response.iter_lines() if line.startswith("data:"))
        for _ in range(3):  # the role chunk, then tokens flowing; then hang up
            next(events)
        text = _metrics(server)
        assert metric(text, "glmserve:num_requests_running") == 1
        assert metric(text, "glmserve:kv_cache_usage_perc") > 0
    assert _aborted(_wait_idle(server)) == aborted + 1


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    aborted = _aborted(_wait_idle(server))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, headers=HEADERS, timeout=0.3)
    assert _aborted(_wait_idle(server)) == aborted + 1


def test_other_requests_unaffected_by_a_bad_one(client, http):
    bad = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400
    ok = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "SCRIPT_HELLO"}])
    assert ok.choices[0].message.content == "Hello there! How can I help?"
    assert json.loads(bad.text)["error"]["type"] == "invalid_request_error"
