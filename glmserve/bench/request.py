"""One streamed request to an OpenAI-compatible server, timed as vLLM's benchmark times it.

The time to first token is taken at the first chunk that carries output (text, content, reasoning, tool calls,
token ids or a finish reason): a chat stream's opening role-only chunk does not count, since a server may send it
before the prompt is even scheduled. Token counts come from the `usage` of the final chunk
(`stream_options.include_usage`), so the per-chunk work is one JSON parse and a timestamp.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from glmserve.bench.datasets import SampleRequest


@dataclass
class RequestFuncOutput:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # gaps between output chunks, seconds
    latency: float = 0.0  # end to end, seconds
    error: str = ""
    text: str = ""  # the generated text (completion text or chat content), for checks on what came back


def request_body(sample: SampleRequest, model: str, chat: bool, ignore_eos: bool) -> dict:
    body = {"model": model, **sample.body, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
            ("max_completion_tokens" if chat else "max_tokens"): sample.max_tokens}
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension, as vLLM's benchmark sends it
    return body


def _has_output(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or choice.get("finish_reason") or choice.get("token_ids")
                or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


async def send_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestFuncOutput:
    output = RequestFuncOutput()
    start = last = time.perf_counter()
    usage = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                output.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return output
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    output.error = json.dumps(chunk["error"])
                    return output
                choices = chunk.get("choices")
                if choices:
                    output.text += choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""
                if choices and _has_output(choices[0]):
                    if output.ttft == 0.0:
                        output.ttft = now - start
                    else:
                        output.itl.append(now - last)
                    last = now
                usage = chunk.get("usage") or usage
        output.latency = time.perf_counter() - start
        if output.ttft == 0.0:
            output.error = "the stream carried no output"
        elif usage is None:
            output.error = "no usage in the stream (the server ignored stream_options.include_usage)"
        else:
            output.prompt_len, output.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            output.success = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        output.error = f"{type(e).__name__}: {e}"
    return output
