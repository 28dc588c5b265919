"""An error after a stream has started reaches the client in the API's own stream shape: Anthropic's `error` event
(which the `anthropic` client raises), the Responses API's `error` event, OpenAI chat's error chunk. Here the error is
the server's deadline (--request-timeout) passing mid-stream."""

import anthropic
import httpx
import openai
import pytest
from conftest import start_server

LONG = {"max_tokens": 400, "messages": [{"role": "user", "content": "Tell me everything."}]}
# Greedy: sampling on random weights can draw the end of text before the deadline, which ends the stream normally
# (the Anthropic and Responses APIs have no ignore_eos; the anthropic SDK sends temperature through extra_body).
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def slow_server(checkpoint, tmp_path_factory):
    flags = ["--request-timeout", "0.5", "--inject-step-delay-ms", "50", "--served-model-name", "m"]
    server = start_server([str(checkpoint), *flags], tmp_path_factory.mktemp("slow") / "server.log")
    yield server
    server.stop()
    assert "Traceback" not in server.output()


def test_anthropic_stream_ends_with_an_error_event(slow_server):
    claude = anthropic.Anthropic(base_url=slow_server.url, api_key="none", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as raised:
        with claude.messages.stream(model="m", extra_body=GREEDY, **LONG) as stream:
            stream.get_final_message()
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "timeout_error"
    assert "--request-timeout" in raised.value.body["error"]["message"]
    body = {"model": "m", "stream": True, **GREEDY, **LONG}
    with httpx.stream("POST", f"{slow_server.url}/v1/messages", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: message_start" and lines[-2] == "event: error"


def test_responses_stream_ends_with_an_error_event(slow_server):
    client = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key="none", max_retries=0)
    events = list(client.responses.create(model="m", input="Tell me everything.", max_output_tokens=400,
                                          temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "error"
    assert events[-1].code == "request_timeout" and [e.sequence_number for e in events] == list(range(len(events)))
