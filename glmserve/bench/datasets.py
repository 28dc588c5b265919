"""The requests `glmserve bench serve` sends: vLLM's `random` dataset and multi-turn `chat` conversations.

A request is the dataset's part of the JSON body (prompt, or messages and tools); the benchmark adds the model,
streaming and sampling fields.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from glmserve.nano import words

# Words from the embedded model's corpus pools, so that its small tokenizer spends few tokens on each.
WORDS = sorted({w for pool in (words.CITIES, words.COUNTRIES, words.PEOPLE, words.CONDITIONS, words.CUISINES,
                               words.INGREDIENTS, words.TOPICS) for w in pool})


@dataclass(frozen=True)
class SampleRequest:
    body: dict  # {"prompt": ...} for /v1/completions, {"messages": ..., "tools": ...} for /v1/chat/completions
    max_tokens: int


def load_tokenizer(directory: str | Path | None):
    """The checkpoint tokenizer in `directory`, or None where there is none."""
    if directory is None or not Path(directory, "tokenizer.json").is_file():
        return None
    from glmserve.serving.tokenizer import Tokenizer

    return Tokenizer(directory)


def random_requests(num_prompts: int, input_len: int, output_len: int, chat: bool, tokenizer,
                    seed: int) -> list[SampleRequest]:
    """Prompts of random corpus words. With a tokenizer, exactly `input_len` tokens: token ids on /v1/completions,
    their text on chat (where the chat template adds its own tokens). Without one, `input_len` words, so the
    length in tokens is approximate (the server's `usage` reports the real one)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        text = " ".join(rng.choice(WORDS) for _ in range(input_len))
        prompt: str | list[int] = text
        if tokenizer is not None:
            ids = tokenizer.encode_plain(text)[:input_len]  # every word is at least one token
            prompt = tokenizer.decode(ids) if chat else ids
        body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        requests.append(SampleRequest(body, output_len))
    return requests


def chat_requests(num_prompts: int, output_len: int, chat: bool, seed: int) -> list[SampleRequest]:
    """One request per assistant turn of held-out corpus conversations (the conversation so far, with its tools
    and thinking mode), in order, so that later turns extend earlier prompts as real chats do. On
    /v1/completions the turn's prompt is sent as the chat template renders it."""
    from glmserve.nano.corpus import examples
    from glmserve.nano.evaluate import request_messages

    requests = []
    for example in examples(seed, num_prompts, "heldout"):
        if not chat:
            requests.append(SampleRequest({"prompt": example.prompt}, output_len))
            continue
        body = {"messages": request_messages(example.messages),
                "chat_template_kwargs": {"enable_thinking": example.thinking}}
        if example.tools:
            body["tools"] = example.tools
        requests.append(SampleRequest(body, output_len))
    return requests
