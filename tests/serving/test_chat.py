"""Chat completions through HTTP with the official client: reasoning, tool calls, thinking on and off, streaming
and not (a stream reassembled must equal the whole response), stop strings, n, logprobs, the real model path."""

import json

import pytest
from conftest import MAX_MODEL_LEN, MODEL_NAME
from serving_script import SCRIPT, TIME_TOOL, WEATHER_CALL, WEATHER_TOOL

from glmserve.serving.parsers import merge_deltas


def user(text):
    return [{"role": "user", "content": text}]


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def streamed(client, messages, **kwargs):
    """Reassemble a stream: per choice (reasoning, content, tool calls, finish_reason), and the usage chunk."""
    deltas, finish, usage, roles = {}, {}, None, {}
    for chunk in chat(client, messages, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta.model_dump(exclude_none=True)
            if "role" in d:
                roles[c.index] = d.pop("role")
            deltas.setdefault(c.index, []).append(d)
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert set(roles.values()) == {"assistant"}
    return {i: (*merge_deltas(d), finish.get(i)) for i, d in deltas.items()}, usage


def whole(choice):
    m = choice.message
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or ()]
    return m.reasoning_content, m.content, calls, choice.finish_reason


def comparable(parts):
    reasoning, content, calls, finish = parts
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} if "function" in c else c
             for c in calls]
    return reasoning, content or None, calls, finish


CASES = [
    # (marker, request extras, expected (reasoning, content, [(name, arguments)], finish_reason))
    ("SCRIPT_HELLO", {}, ("Greet them.", "Hello there! How can I help?", [], "stop")),
    ("SCRIPT_SWITCH", {}, ("Thinking it over.", "Considered answer.", [], "stop")),
    ("SCRIPT_SWITCH", {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
     (None, "Direct answer.", [], "stop")),
    ("SCRIPT_SWITCH", {"extra_body": {"enable_thinking": False}}, (None, "Direct answer.", [], "stop")),
    ("SCRIPT_SWITCH", {"reasoning_effort": "none"}, (None, "Direct answer.", [], "stop")),
    ("SCRIPT_SWITCH", {"reasoning_effort": "high"}, ("Thinking it over.", "Considered answer.", [], "stop")),
    ("SCRIPT_TOOL", {"tools": [WEATHER_TOOL]},
     ("Need the weather.", None, [("get_weather", {"location": "北京", "days": 3})], "tool_calls")),
    ("SCRIPT_TWO_CALLS", {"tools": [WEATHER_TOOL, TIME_TOOL], "extra_body": {"enable_thinking": False}},
     (None, "Let me check both.", [("get_weather", {"location": "Paris"}), ("get_time", {})], "tool_calls")),
    ("SCRIPT_REQUIRED", {"tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required"},
     (None, None, [("get_weather", {"location": "Rome"})], "tool_calls")),
    ("SCRIPT_REQUIRED", {"tools": [WEATHER_TOOL], "tool_choice": "required", "reasoning_effort": "none"},
     (None, None, [("get_weather", {"location": "Oslo"})], "tool_calls")),
    ("SCRIPT_NAMED", {"tools": [WEATHER_TOOL, TIME_TOOL],
                      "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     (None, None, [("get_time", {})], "tool_calls")),
    # tool_choice none: no parsing; the raw markup is content.
    ("SCRIPT_RAW_TOOL", {"tools": [WEATHER_TOOL], "tool_choice": "none"},
     (None, "Calling: <tool_call>get_weather\n</tool_call>", [], "stop")),
    ("SCRIPT_STOP", {"stop": ["STOP"]}, (None, "alpha beta ", [], "stop")),
]


def _expected(parts):
    reasoning, content, calls, finish = parts
    return reasoning, content, [{"name": n, "arguments": json.dumps(a, ensure_ascii=False)} for n, a in calls], finish


@pytest.mark.parametrize("marker,extra,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_stream_and_whole_agree_with_the_script(client, marker, extra, expected):
    response = chat(client, user(marker), **extra)
    (choice,) = response.choices
    got = whole(choice)
    assert got == _expected(expected)
    for call in choice.message.tool_calls or ():
        assert call.type == "function" and call.id
    stream, usage = streamed(client, user(marker), **extra)
    assert comparable(stream[0]) == got
    assert usage.completion_tokens == response.usage.completion_tokens
    assert usage.prompt_tokens == response.usage.prompt_tokens


def test_stop_string_never_streamed(client):
    pieces = [c.choices[0].delta.content or "" for c in chat(client, user("SCRIPT_STOP"), stop="STOP", stream=True)
              if c.choices]
    assert "".join(pieces) == "alpha beta "
    assert not any("S" in p for p in pieces)


def test_output_cut_off_while_thinking_is_all_reasoning(client):
    response = chat(client, user("SCRIPT_LONG_THOUGHT"), max_tokens=6)
    reasoning, content, calls, finish = whole(response.choices[0])
    thought = SCRIPT["SCRIPT_LONG_THOUGHT"].split("<think>")[1]
    assert reasoning and thought.startswith(reasoning) and content is None and not calls and finish == "length"
    stream, _ = streamed(client, user("SCRIPT_LONG_THOUGHT"), max_tokens=6)
    assert comparable(stream[0]) == (reasoning, content, calls, finish)


def test_tool_result_round_trip(client, http):
    """The assistant message as the client returns it, fed back with a tool result, renders GLM's history."""
    first = chat(client, user("SCRIPT_TOOL"), tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    messages = user("SCRIPT_TOOL") + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'},
    ]
    tokens = http.post("/tokenize", json={"messages": messages, "tools": [WEATHER_TOOL]}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert prompt.endswith("SCRIPT_TOOL<|assistant|>\n<think>Need the weather.</think>\n" + WEATHER_CALL
                           + '<|observation|>\n<tool_response>\n{"weather": "sunny"}\n</tool_response><|assistant|>')


def test_real_model_matches_offline_engine(client, http, checkpoint):
    """No script matches: the real model runs, and greedy output equals the offline LLM's."""
    from glmserve import LLM, SamplingParams

    messages = user("What is the weather like?")
    prompt_ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    response = chat(client, messages, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    llm = LLM(checkpoint, num_kv_blocks=MAX_MODEL_LEN // 16, max_model_len=MAX_MODEL_LEN)
    offline = llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0, max_tokens=12,
                                                                            ignore_eos=True))[0].outputs[0]
    # The output holds no <think>, so the reasoning parser only strips its leading whitespace.
    assert response.choices[0].message.reasoning_content is None
    assert response.choices[0].message.content == offline.text.lstrip()
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(prompt_ids)


def test_n_choices_and_seed(client):
    kwargs = dict(n=3, temperature=1.0, seed=7, max_tokens=6, extra_body={"ignore_eos": True})
    response = chat(client, user("Tell me something."), **kwargs)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    again = chat(client, user("Tell me something."), **kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    stream, usage = streamed(client, user("Tell me something."), **kwargs)
    assert sorted(stream) == [0, 1, 2] and usage.completion_tokens == 18
    assert [stream[i][1] for i in range(3)] == [c.message.content for c in response.choices]


def test_logprobs(client):
    response = chat(client, user("Count to three."), logprobs=True, top_logprobs=3, max_tokens=5, temperature=0,
                    extra_body={"ignore_eos": True})
    entries = response.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the sampled token is the top one
        assert isinstance(e.bytes, list)
    chunks = chat(client, user("Count to three."), logprobs=True, max_tokens=5, temperature=0, stream=True,
                  extra_body={"ignore_eos": True})
    streamed_entries = [e for c in chunks if c.choices and c.choices[0].logprobs
                        for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed_entries] == [e.token for e in entries]
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in entries)


def test_scripted_logprobs_and_message_history(client):
    history = user("What is 2+2?") + [{"role": "assistant", "content": "4", "reasoning_content": "easy"}]
    response = chat(client, history + user("SCRIPT_HELLO"), logprobs=True)
    entries = response.choices[0].logprobs.content
    assert all(e.logprob == 0.0 for e in entries)
    assert len(entries) == response.usage.completion_tokens - 1  # the stop token is not shown


def test_concurrent_requests_keep_their_own_outputs(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        if i % 2:
            stream, _ = streamed(client, user("SCRIPT_STOP"), n=2, stop=["STOP"])
            return [stream[j][1] for j in range(2)]
        return [c.message.content for c in chat(client, user("SCRIPT_HELLO"), n=2).choices]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for i, contents in enumerate(results):
        assert contents == (["alpha beta "] * 2 if i % 2 else ["Hello there! How can I help?"] * 2)
