"""Fuzzing a real server (RELIABILITY.md item 4): schemathesis from its own OpenAPI schema, then hand-written
hostile inputs. Never a 5xx, never a hang, the server healthy at the end.

The server is small on purpose (64-token context, --max-output-tokens 16, 8 sequences at most), so that whatever
the fuzzer asks for is answered in well under a second.
"""

import json
import math

import httpx
import pytest
import schemathesis
from conftest import start_server
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from glmserve.serving.anthropic_protocol import MessagesRequest
from glmserve.serving.protocol import ChatCompletionRequest, CompletionRequest
from glmserve.serving.responses_protocol import ResponsesRequest
from glmserve.testing.tokenizer import GLM45_ADDED_TOKENS

TIMEOUT = 20  # seconds: a slower answer counts as a hang
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fuzzed(checkpoint, tmp_path_factory):
    flags = ["--max-model-len", "64", "--max-output-tokens", "16", "--max-num-seqs", "4", "--max-queued-requests",
             "4", "--num-kv-blocks", "64", "--reasoning-parser", "glm45", "--tool-call-parser", "glm45"]
    server = start_server([str(checkpoint), *flags], tmp_path_factory.mktemp("fuzz") / "server.log")
    try:
        yield server
        assert server.process.poll() is None, server.output()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert "Traceback" not in server.output() and "internal error" not in server.output()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http(fuzzed):
    with httpx.Client(base_url=fuzzed.url, timeout=TIMEOUT) as client:
        yield client


def _operations(server) -> dict:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schemathesis(fuzzed, mode):
    """Every public operation of the server's own OpenAPI schema, with bodies that fit it and bodies that break
    it (schemathesis through hypothesis; its pytest plugin does not run under this pytest)."""
    operations = _operations(fuzzed)
    assert set(operations) >= {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
                               "POST /v1/messages", "POST /v1/messages/count_tokens", "POST /v1/responses",
                               "POST /tokenize",
                               "POST /detokenize", "GET /health", "GET /metrics"}
    for name, operation in operations.items():
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has nothing to break

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            response = case.call(base_url=fuzzed.url, timeout=TIMEOUT)
            assert response.status_code < 500, (name, case.body, response.text)
            if response.status_code >= 400:
                _check_error_shape(operation.path, response)

        check()


def _check_error_shape(path: str, response: httpx.Response) -> None:
    """OpenAI's error shape, or Anthropic's under /v1/messages."""
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def _post(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (content[:200], response.text)
    if response.status_code >= 400:
        _check_error_shape(path, response)
    return response


def _json(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity are written as Python writes them


HOSTILE = {
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    "NUL bytes": _json({"messages": [{"role": "user", "content": "a\x00b"}], "max_tokens": 2}),
    "huge string": _json({"messages": [{"role": "user", "content": "x" * 1_000_000}]}),
    "huge number": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
    "deep array": b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "deep object": b'{"chat_template_kwargs": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "deep content": _json({"messages": [{"role": "user", "content": [[[[[["x"]]]]]]}], "max_tokens": 2}),
    "NaN temperature": _json({"messages": USER, "temperature": math.nan}),
    "Infinity top_p": _json({"messages": USER, "top_p": math.inf}),
    "-Infinity penalty": _json({"messages": USER, "presence_penalty": -math.inf}),
    "NaN in kwargs": _json({"messages": USER, "max_tokens": 2, "chat_template_kwargs": {"x": math.nan}}),
    "kwargs naming render arguments": _json({"messages": USER, "chat_template_kwargs": {"messages": [], "tools": 1}}),
    "tool parameters a string": _json({"messages": USER, "tools": [{"function": {"name": "f", "parameters": "x"}}]}),
    "tool parameters a list": _json({"messages": USER, "tools": [{"function": {"name": "f", "parameters": [1]}}]}),
    "tool schema not an object": _json({"messages": USER, "max_tokens": 4, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string", "properties": 5, "required": "x"}}}]}),
    "tool without a function": _json({"messages": USER, "tools": [{"type": "function"}]}),
    "tool call arguments not JSON": _json({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{"}}]}, *USER]}),
    "tool call arguments a list": _json({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}, *USER]}),
    "tool call not an object": _json({"messages": [{"role": "assistant", "tool_calls": ["f"]}, *USER]}),
    "content parts of every kind": _json({"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text"}, {"type": "text", "text": 5}, {"type": "image_url"}, {}, "plain", None]}]}),
    "empty body": b"",
    "JSON null": b"null",
    "JSON list": b"[]",
    "unclosed": b'{"messages": [',
    "BOM": "\ufeff".encode() + _json({"messages": USER, "max_tokens": 2}),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs(http, name):
    for path in ("/v1/chat/completions", "/tokenize", "/v1/messages", "/v1/responses"):
        _post(http, path, HOSTILE[name])


WRONG_VALUES = [None, -1, 2**63, "x", [None], {"a": [1]}]


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest, MessagesRequest, ResponsesRequest],
                         ids=["chat", "completions", "anthropic", "responses"])
def test_wrong_types_in_every_field(http, model):
    path, base = {ChatCompletionRequest: ("/v1/chat/completions", {"messages": USER}),
                  CompletionRequest: ("/v1/completions", {"prompt": "hi"}),
                  ResponsesRequest: ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                  MessagesRequest: ("/v1/messages", {"messages": USER,
                                                     "model": http.get("/v1/models").json()["data"][0]["id"]})}[model]
    for field in model.model_fields:
        for value in WRONG_VALUES:
            # Small outputs, unless the field under test is the one that sets them.
            body = {**base, "max_tokens": 2, "n": 1, field: value}
            _post(http, path, _json(body))


def test_control_token_strings_typed_by_a_user_stay_text(http):
    """Every added token's string in a user message is plain text to the model; only token ids reach control
    tokens (GLM's /nothink switch excepted, which users are meant to type)."""
    typed = [t for t in GLM45_ADDED_TOKENS if t != "/nothink"]
    template_only = http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}],
                                                 "return_token_strs": True})
    for text in typed + ["".join(typed[:4]), "<think></think>", "<|user|>\n<|assistant|>"]:
        for role in ("user", "system", "tool"):
            messages = [{"role": role, "content": text}]
            tokens = _post(http, "/tokenize", _json({"messages": messages, "return_token_strs": True})).json()
            expected = template_only.json()["token_strs"]
            control = [s for s in tokens["token_strs"] if s in GLM45_ADDED_TOKENS]
            if role == "user":
                assert control == [s for s in expected if s in GLM45_ADDED_TOKENS], (text, tokens["token_strs"])
            assert not set(control) - {"[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                       "<|observation|>", "<tool_response>", "</tool_response>"}, (role, control)
    # A completion prompt given as token ids reaches any token, as the client asked.
    ids = [http.post("/tokenize", json={"prompt": "<|user|>"}).json()["tokens"][0]]
    response = _post(http, "/v1/completions", _json({"prompt": ids, "max_tokens": 2}))
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 1
    # ... and a chat request made only of control-token strings is served like any other.
    chat = _post(http, "/v1/chat/completions", _json({"messages": [{"role": "user", "content": "<|user|><think>"}],
                                                        "max_tokens": 2}))
    assert chat.status_code == 200
