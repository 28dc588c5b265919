"""Fine-tuning data: a JSONL of OpenAI-format conversations → token sequences with the loss on assistant turns.

One conversation a line: `{"messages": [...], "tools": [...]}` with system, user, assistant (`content`,
`reasoning_content`, `tool_calls` with JSON-string or object arguments) and tool messages, as a chat completions
request sends them; optional `chat_template_kwargs` (e.g. `{"enable_thinking": false}`). An assistant message with
`"weight": 0` is context only (OpenAI's fine-tuning convention); every other assistant turn is trained.

Each assistant turn is rendered as the server renders a request (normalize_messages, then the checkpoint's chat
template): the prompt up to the generation prompt, and the completion is what the template writes after it for
that turn, plus the token GLM-4.5 stops with (`<|observation|>` after tool calls, else `<|user|>`), exactly the
text the model must generate. The embedded model's corpus code turns these into sequences (glmserve.nano.data).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from glmserve.nano.corpus import OBSERVATION, USER, Example
from glmserve.nano.data import Sequence, encode
from glmserve.serving.chat_template import ChatTemplateError, normalize_messages, render_chat
from glmserve.serving.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A line of the data file is not a conversation this module can train on."""


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    chat_template_kwargs: dict = field(default_factory=dict)


def parse_conversation(record: object) -> Conversation:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError('expected an object with a "messages" list')
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"message {i} must be an object with a role in {ROLES}")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in record["messages"]):
        raise DataError("no assistant message to train on")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError('"tools" must be a list of tool objects')
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError('"chat_template_kwargs" must be an object')
    return Conversation(record["messages"], tools or None, kwargs)


def load_conversations(path: str | Path) -> list[Conversation]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conversations.append(parse_conversation(json.loads(line)))
            except (json.JSONDecodeError, DataError) as e:
                raise DataError(f"{path}:{number}: {e}") from e
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def render_turns(template: str, conversation: Conversation, special_tokens: dict | None = None
                 ) -> tuple[Example, ...]:
    """One Example (prompt, completion) per trained assistant turn."""
    messages = normalize_messages(conversation.messages)
    kwargs = {**(special_tokens or {}), **conversation.chat_template_kwargs}
    examples = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("weight", 1):
            continue
        prompt = render_chat(template, messages[:i], conversation.tools, add_generation_prompt=True, **kwargs)
        full = render_chat(template, messages[: i + 1], conversation.tools, add_generation_prompt=False, **kwargs)
        if not full.startswith(prompt):
            raise DataError(f"assistant message {i} does not render as a continuation of its prompt (e.g. reasoning "
                            f"with thinking off): prompt ends {prompt[-60:]!r}, turn renders {full[-80:]!r}")
        stop = OBSERVATION if message.get("tool_calls") else USER
        user = next((m["content"] for m in reversed(messages[:i]) if m["role"] == "user"), "")
        thinking = kwargs.get("enable_thinking", True) is not False
        examples.append(Example("finetune", thinking, str(user), messages[:i], prompt, full[len(prompt):] + stop,
                                conversation.tools, {}))
    return tuple(examples)


def sequences(tokenizer: Tokenizer, template: str, conversations: list[Conversation], max_len: int
              ) -> tuple[list[Sequence], int]:
    """The token sequences of `conversations` (turns of one conversation share a sequence while each prompt
    extends the previous turn), and how many were dropped for being longer than `max_len`."""
    kept, dropped = [], 0
    for number, conversation in enumerate(conversations):
        try:
            turns = render_turns(template, conversation, tokenizer.special_tokens_map)
        except ChatTemplateError as e:
            raise DataError(f"conversation {number + 1}: {e}") from e
        for sequence in encode(tokenizer, turns):
            if len(sequence.ids) <= max_len:
                kept.append(sequence)
            else:
                dropped += 1
    return kept, dropped


def split_heldout(conversations: list[Conversation], fraction: float, seed: int
                  ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): a seeded random `fraction` of the conversations held out (at least one if > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(order))) if fraction > 0 else 0
    if count >= len(order):
        raise DataError(f"{len(order)} conversations leave none to train on with a held-out fraction of {fraction}")
    heldout = set(order[:count])
    return ([c for i, c in enumerate(conversations) if i not in heldout],
            [c for i, c in enumerate(conversations) if i in heldout])
