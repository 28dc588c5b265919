#!/usr/bin/env python
"""A short session with the embedded model through the official `openai` client: a thinking-mode sum, a direct
answer, and a tool call answered from the tool's result. Start the server first (`make serve`), then run
`python examples/nano_transcript.py`; README.md shows a real run."""

import argparse
import json

from openai import OpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}


def show(message) -> None:
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if reasoning:
        print(f"  reasoning_content: {reasoning}")
    if message.content:
        print(f"  content: {message.content}")
    for call in message.tool_calls or []:
        print(f"  tool_calls: {call.function.name}({call.function.arguments})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id

    def ask(messages, thinking=True, tools=None):
        extra = {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}
        return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=200,
                                              **({"tools": tools} if tools else {}), **extra).choices[0].message

    for question, thinking in (("What is 47 + 38?", True), ("What is 90 - 25?", False)):
        print(f"user ({'thinking' if thinking else 'no thinking'}): {question}")
        show(ask([{"role": "user", "content": question}], thinking))

    messages = [{"role": "user", "content": "What's the weather in Lisbon?"}]
    print(f"user (tools: get_weather): {messages[0]['content']}")
    reply = ask(messages, thinking=False, tools=[WEATHER])
    show(reply)
    if reply.tool_calls:
        call = reply.tool_calls[0]
        result = {"temperature": 21, "condition": "sunny"}
        print(f"tool: {json.dumps(result)}")
        messages += [reply.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
        show(ask(messages, thinking=False, tools=[WEATHER]))


if __name__ == "__main__":
    main()
