"""Tool calling and thinking mode through glmserve's OpenAI-compatible API, after zai-org/GLM-4.5's
inference/api_request.py: ask for the weather with tools offered (thinking on), run the tool the model called,
feed the result back and get the answer with thinking off. A model may answer without calling a tool, or call
one with arguments its schema does not have (the embedded glm-4.5-nano does not read Chinese); then what it said is
printed and the example ends there. (`"strict": true` on a tool, or `tool_choice`, holds the call to its schema.)

    glmserve serve                          # the embedded glm-4.5-nano; or a checkpoint directory, e.g.
    glmserve serve /models/GLM-4.5-Air --tool-call-parser glm45 --reasoning-parser glm45 --enable-auto-tool-choice
    python examples/api_request.py --base-url http://127.0.0.1:8000/v1
"""

import argparse
import json

from openai import OpenAI

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "获取指定城市的天气信息",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "城市名称，例如：北京"}},
                "required": ["location"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "return_delivered_order_items",
            "description": "退回已送达订单中的商品",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "订单号，以#开头"},
                    "item_ids": {"type": "array", "items": {"type": "string"}, "description": "要退回的商品编号"},
                    "payment_method_id": {"type": "string", "description": "退款的支付方式"},
                },
                "required": ["order_id", "item_ids", "payment_method_id"],
                "additionalProperties": False,
            },
        },
    },
]


def get_weather(location: str) -> dict:
    return {"city": location, "date": "2024-06-27", "weather": "晴", "temperature": "26C"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", help="default: the first model the server lists")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "请你调用工具，用中文回答问题。"},
        {"role": "user", "content": "请帮我查询一下北京的天气。"},
    ]
    # Thinking on (the default). The official example forgets `tools=` here; the model needs them to call one.
    completion = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=4096,
                                                temperature=0.0)
    message = completion.choices[0].message
    print("reasoning:", message.model_extra.get("reasoning_content"))
    if not message.tool_calls:
        print("answer (no tool call):", message.content)
        return
    tool_call = message.tool_calls[0]
    arguments = json.loads(tool_call.function.arguments)
    print("tool call:", tool_call.function.name, arguments)
    if tool_call.function.name != "get_weather" or set(arguments) != {"location"}:
        print("not a call get_weather(location) can run: the example ends here")
        return

    messages.append(message.model_dump(exclude_none=True))
    result = get_weather(**arguments)
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps(result, ensure_ascii=False)})
    completion = client.chat.completions.create(
        model=model, messages=messages, tools=tools,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    print("answer:", completion.choices[0].message.content)


if __name__ == "__main__":
    main()
