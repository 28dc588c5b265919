"""The embedded glm-4.5-nano end to end: `glmserve serve` with no MODEL, through the official `openai` client.

Held-out conversations of the model's corpus (never trained on) give the requests: a thinking-mode arithmetic
question must come back with reasoning in `reasoning_content` and an answer in `content`; a tool request must come
back as `tool_calls` naming one of the offered functions with a JSON object of arguments. These check the path
from the model's text to the API; how often the model is right is what `python -m glmserve.nano.evaluate`
measures. With MTP speculative decoding on (the model card's SGLang flags), streamed reasoning, content and tool
calls must equal the non-streamed ones.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from openai import OpenAI

from glmserve import LLM, SamplingParams
from glmserve.models import EMBEDDED_MODEL
from glmserve.nano.corpus import conversations
from glmserve.nano.evaluate import kind_of
from glmserve.testing.server import start_server

SPECULATIVE = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
               "--speculative-num-draft-tokens", "4"]
PARSERS = ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45"]


def heldout(kind: str, count: int):
    """The first `count` held-out turns of one of glmserve.nano.evaluate's kinds ("tool_call": a tool from the
    realistic pool, requested in words never trained on; "arithmetic_thinking"; "arithmetic_direct")."""
    found = []
    for conversation in conversations(0, "heldout"):
        for example in conversation:
            if kind_of(example) == kind and len(example.expected.get("calls", ())) <= 1:
                found.append(example)
            if len(found) == count:
                return found


def request_args(example) -> dict:
    kwargs = dict(model="glm-4.5-nano", messages=example.messages, temperature=0, max_tokens=200,
                  extra_body={"chat_template_kwargs": {"enable_thinking": example.thinking}})
    if example.tools:
        kwargs["tools"] = example.tools
    return kwargs


def ask(client: OpenAI, example) -> tuple[str, str, list, int]:
    """(reasoning, content, [(tool name, arguments)], completion tokens), not streamed."""
    response = client.chat.completions.create(**request_args(example))
    message = response.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    return (message.model_extra.get("reasoning_content") or "", message.content or "", calls,
            response.usage.completion_tokens)


def ask_streaming(client: OpenAI, example) -> tuple[str, str, list, int]:
    """The same, streamed and reassembled; the last item is the number of chunks."""
    reasoning, content, calls, chunks = "", "", {}, 0
    for chunk in client.chat.completions.create(stream=True, **request_args(example)):
        if not chunk.choices:
            continue
        chunks += 1
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name, args = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), args + (call.function.arguments or ""))
    return reasoning, content, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())], chunks


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`glmserve serve` with no MODEL and no flags (the glm45 parsers are on by default); also times its first
    answer."""
    log = tmp_path_factory.mktemp("embedded") / "serve.log"
    started = time.monotonic()
    server = start_server([], log)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    client.chat.completions.create(model="glm-4.5-nano", messages=[{"role": "user", "content": "Hi!"}],
                                   max_tokens=8)
    server.first_answer_s = time.monotonic() - started
    yield server, client
    server.stop()


def test_serves_the_embedded_model_under_its_name(default_server):
    server, client = default_server
    assert [m.id for m in client.models.list().data] == ["glm-4.5-nano"]
    assert server.first_answer_s < 10  # issue 4: first answer within 10 s of start on a laptop-class CPU


def test_thinking_answer(default_server):
    _, client = default_server
    example = heldout("arithmetic_thinking", 1)[0]
    reasoning, content, calls, _ = ask(client, example)
    assert reasoning.strip() and content.strip() and not calls
    first_operand = re.match(r"\d+", example.expected["problem"]).group()
    assert first_operand in reasoning  # it reasons about this problem
    assert not any(tag in reasoning + content for tag in ("<think>", "</think>", "<|"))


def test_direct_answer_without_thinking(default_server):
    _, client = default_server
    example = heldout("arithmetic_direct", 1)[0]
    reasoning, content, _, _ = ask(client, example)
    assert reasoning == "" and content.strip()


def test_tool_call(default_server):
    _, client = default_server
    example = heldout("tool_call", 1)[0]
    _, _, calls, _ = ask(client, example)
    offered = {tool["function"]["name"] for tool in example.tools}
    assert len(calls) == 1 and calls[0][0] in offered and isinstance(calls[0][1], dict)


def test_streaming_with_speculative_decoding_equals_non_streaming(tmp_path):
    server = start_server([*PARSERS, *SPECULATIVE], tmp_path / "spec.log")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        examples = heldout("arithmetic_thinking", 2) + heldout("arithmetic_direct", 1) + heldout("tool_call", 3)
        total_chunks = total_tokens = 0
        for example in examples:
            *whole, num_tokens = ask(client, example)
            *streamed, num_chunks = ask_streaming(client, example)
            assert streamed == whole, example.user
            total_chunks += num_chunks
            total_tokens += num_tokens
        assert total_chunks < total_tokens  # several tokens per chunk: drafts were accepted
        metrics = scrape_metrics(server.url)
        assert metrics["glmserve:spec_decode_num_accepted_tokens_total"] > 0
    finally:
        server.stop()


def scrape_metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_transcript_example_runs(default_server):
    """examples/nano_transcript.py, whose output README.md shows."""
    server, _ = default_server
    script = Path(__file__).resolve().parents[2] / "examples" / "nano_transcript.py"
    result = subprocess.run([sys.executable, str(script), "--base-url", f"{server.url}/v1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("user (") == 3 and "reasoning_content: " in result.stdout


def test_parsers_can_be_turned_off(tmp_path):
    server = start_server(["--reasoning-parser", "none", "--tool-call-parser", "none"], tmp_path / "off.log")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        example = heldout("arithmetic_thinking", 1)[0]
        message = client.chat.completions.create(**request_args(example)).choices[0].message
        assert message.model_extra.get("reasoning_content") is None and message.content.strip()
        tool_example = heldout("tool_call", 1)[0]
        with pytest.raises(openai.BadRequestError, match="--tool-call-parser none"):
            client.chat.completions.create(**request_args(tool_example))
    finally:
        server.stop()


def test_api_request_example_runs_to_the_end(default_server):
    """examples/api_request.py (the model card's example): the embedded model, which reads no Chinese, answers its
    question without a tool call or calls get_weather with keys the schema does not have; the example reports
    either instead of crashing."""
    server, _ = default_server
    script = Path(__file__).resolve().parents[2] / "examples" / "api_request.py"
    result = subprocess.run([sys.executable, str(script), "--base-url", f"{server.url}/v1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reasoning: " in result.stdout
    assert "answer" in result.stdout or "not a call get_weather(location) can run" in result.stdout, result.stdout


WEATHER = {"name": "get_weather", "description": "Get the current weather for a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}


def _claude_turn(claude, messages, thinking):
    """One greedy turn, whole and streamed (the stream's accumulated message must equal the whole one)."""
    kwargs = dict(model="glm-4.5-nano", max_tokens=200, messages=messages, tools=[WEATHER], thinking=thinking,
                  extra_body={"temperature": 0})
    message = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    whole, accumulated = message.to_dict(), final.to_dict()
    for m in (whole, accumulated):
        m.pop("id")
        for block in m["content"]:
            block.pop("id", None)  # tool_use ids are fresh per request
    assert accumulated == whole
    return message


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}],
                         ids=["thinking", "no-thinking"])
def test_claude_tool_loop(default_server, thinking):
    """The official anthropic client through a tool loop: tool_use, then the tool_result, then the answer."""
    server, _ = default_server
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What's the weather in Lisbon?"}]
    first = _claude_turn(claude, messages, thinking)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == (["thinking"] if thinking["type"] == "enabled" else []) + ["tool_use"]
    call = first.content[-1]
    assert call.name == "get_weather" and call.input == {"city": "Lisbon"} and call.id.startswith("toolu_")
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": json.dumps({"temperature": 21, "condition": "sunny"})}]}]
    answer = _claude_turn(claude, messages, thinking)
    assert answer.stop_reason == "end_turn" and answer.content[-1].type == "text"
    assert "21" in answer.content[-1].text
    assert all(b.type != "thinking" for b in answer.content) == (thinking["type"] == "disabled")


def test_offline_llm_shares_the_servers_defaults_and_stop_strings(default_server, tmp_path):
    """One output path: `LLM.generate` applies generation_config.json's sampling defaults as the server applies them
    to a request that sets none, and the same seed and stop string give the same text, finish and stop reason."""
    server, client = default_server
    llm = LLM()
    config = json.loads((EMBEDDED_MODEL / "generation_config.json").read_text())
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p) == (config["temperature"], config["top_p"]) != (1.0, 1.0)
    messages = [{"role": "user", "content": "What is 47 + 38?"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]

    def both(stop):
        served = client.completions.create(model="glm-4.5-nano", prompt=ids, seed=11, max_tokens=60, stop=stop)
        offline = llm.generate({"prompt_token_ids": ids}, replace(defaults, seed=11, max_tokens=60, stop=stop))
        return served.choices[0], offline[0].outputs[0]

    served, offline = both(None)
    assert (served.text, served.finish_reason) == (offline.text, offline.finish_reason)
    full = offline.text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    served, offline = both([stop])
    assert served.text == offline.text == full[:full.index(stop)]
    assert ("stop", stop) == (served.finish_reason, served.model_extra["stop_reason"]) == (
        offline.finish_reason, offline.stop_reason)


def test_offline_llm_without_sampling_params_uses_the_checkpoints_defaults(tmp_path):
    """A copy of the embedded model whose generation_config.json asks for greedy decoding: generate() without
    sampling_params is greedy (SamplingParams()' own temperature is 1.0)."""
    model = Path(shutil.copytree(EMBEDDED_MODEL, tmp_path / "greedy-nano"))
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    llm = LLM(model)
    prompt = {"prompt_token_ids": llm.tokenizer.encode("[gMASK]<sop><|user|>\nTell me a story.<|assistant|>")}
    unset = llm.generate([prompt] * 2)
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0))[0].outputs[0]
    assert [o.outputs[0].token_ids for o in unset] == [greedy.token_ids] * 2 and len(greedy.token_ids) == 16
