"""Fine-tuning data: the loss covers exactly the assistant turns' text as the chat template writes it."""

import json

import pytest

from glmserve.finetune.data import DataError, load_conversations, parse_conversation, sequences, split_heldout
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.chat_template import normalize_messages, render_chat
from glmserve.serving.templates import glm45_chat_template
from glmserve.serving.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Lisbon?"},
        {"role": "assistant", "content": "", "reasoning_content": "I will call get_weather.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Lisbon\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "It returned 21."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
}
# What the model writes for each assistant turn after its prompt (GLM45.md's format), stop token included.
TURNS = [
    "\n<think>I will call get_weather.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Lisbon</arg_value>\n</tool_call><|observation|>",
    "\n<think>It returned 21.</think>\nIt is 21 degrees.<|user|>",
    "\n<think></think>\nYou're welcome!<|user|>",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(EMBEDDED_MODEL)


def _target_spans(tokenizer, sequence) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    spans, current = [], []
    for token, target in zip(sequence.ids, sequence.target):
        if target:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span, skip_special_tokens=False) for span in spans]


def test_the_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    seqs, dropped = sequences(tokenizer, glm45_chat_template(), [parse_conversation(CONVERSATION)], 1024)
    assert dropped == 0
    # The first two turns share a sequence (the second prompt extends the first turn); after the next user message
    # the template drops the earlier reasoning, so the last turn starts a sequence of its own, as it is served.
    assert len(seqs) == 2
    assert [span for s in seqs for span in _target_spans(tokenizer, s)] == TURNS
    # Around them, each sequence is the conversation as the server renders it (system, tools, user, tool results
    # and the turns before as prompt).
    template, messages = glm45_chat_template(), normalize_messages(CONVERSATION["messages"])
    rendered = [render_chat(template, messages[:5], TOOLS, add_generation_prompt=False) + "<|user|>",
                render_chat(template, messages, TOOLS, add_generation_prompt=False) + "<|user|>"]
    assert [tokenizer.decode(s.ids, skip_special_tokens=False) for s in seqs] == rendered
    assert "<|system|>\nYou are terse.<|user|>" in rendered[0]


def test_thinking_off_and_context_only_turns(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 0},
                           {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
              "chat_template_kwargs": {"enable_thinking": False}}
    seqs, _ = sequences(tokenizer, glm45_chat_template(), [parse_conversation(record)], 1024)
    assert [span for s in seqs for span in _target_spans(tokenizer, s)] == ["\n4.<|user|>"]
    assert tokenizer.decode(seqs[0].ids, skip_special_tokens=False).endswith(
        "<|user|>\nWhat is 2 + 2?/nothink<|assistant|>\n<think></think>\n4.<|user|>")


def test_too_long_sequences_are_dropped_and_counted(tokenizer):
    seqs, dropped = sequences(tokenizer, glm45_chat_template(), [parse_conversation(CONVERSATION)], 40)
    assert (seqs, dropped) == ([], 2)


@pytest.mark.parametrize("line, message", [
    ("not json", "2:"),
    (json.dumps({"prompt": "x"}), '"messages" list'),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role in"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}], "tools": {}}), '"tools" must be a list'),
])
def test_bad_lines_are_refused_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_conversations(path)
    assert f"{path}:2:" in str(error.value)


def test_reasoning_with_thinking_off_is_refused(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"}],
              "chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(DataError, match="does not render as a continuation"):
        sequences(tokenizer, glm45_chat_template(), [parse_conversation(record)], 1024)


def test_heldout_split_is_seeded_and_disjoint():
    conversations = [parse_conversation({"messages": [{"role": "user", "content": str(i)},
                                                      {"role": "assistant", "content": "ok"}]})
                     for i in range(40)]
    train, heldout = split_heldout(conversations, 0.1, seed=3)
    assert len(heldout) == 4 and len(train) == 36
    assert {id(c) for c in train}.isdisjoint(id(c) for c in heldout)
    assert split_heldout(conversations, 0.1, seed=3)[1] == heldout
    assert split_heldout(conversations, 0.1, seed=4)[1] != heldout
    with pytest.raises(DataError):
        split_heldout(conversations[:1], 0.5, seed=0)
