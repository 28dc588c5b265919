"""The corpus: seeded synthetic conversations rendered with glmserve's GLM-4.5 chat template.

Each assistant turn becomes an `Example`: the rendered prompt up to the generation prompt, and the completion the
model must write, ending with the stop token GLM-4.5 ends that turn with (`<|observation|>` after tool calls,
otherwise `<|user|>`, the token that would follow). The completion is the template's own rendering of the turn, so
the model learns exactly the format the server parses.

Held-out split: a conversation is held out when any of its keys (user texts, arithmetic problems, tool names)
hashes into the held-out bucket (`split`). Training never sees a held-out key, so held-out tool names (and
argument keys) are never in training.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from glmserve.nano.dialogues import SKILLS, Dialogue, user_style_tool_dialogue
from glmserve.nano.split import is_heldout
from glmserve.serving.chat_template import render_chat
from glmserve.serving.templates import glm45_chat_template

OBSERVATION, USER = "<|observation|>", "<|user|>"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Example:
    skill: str
    thinking: bool
    user: str  # the last user message before this turn
    messages: list[dict]  # the conversation before this turn (the dialogue's messages), which `prompt` renders
    prompt: str
    completion: str  # the target text, stop token included
    tools: list[dict] | None
    expected: dict  # what the turn must do: {"calls": ...}, {"values": ...}, {"answer": ...} or {}


@lru_cache(maxsize=1)
def chat_template() -> str:
    return glm45_chat_template()


def render(dialogue: Dialogue, thinking: bool) -> tuple[Example, ...]:
    """One Example per assistant message of `dialogue`."""
    template, examples = chat_template(), []
    kwargs = {"tools": dialogue.tools, "enable_thinking": thinking}
    turns = [i for i, m in enumerate(dialogue.messages) if m["role"] == "assistant"]
    for i, expected in zip(turns, dialogue.expected, strict=True):
        messages = dialogue.messages[:i]
        prompt = render_chat(template, messages, add_generation_prompt=True, **kwargs)
        full = render_chat(template, dialogue.messages[: i + 1], add_generation_prompt=False, **kwargs)
        if not full.startswith(prompt):
            raise AssertionError(f"turn {i} does not extend its prompt: {prompt!r} / {full!r}")
        stop = OBSERVATION if dialogue.messages[i].get("tool_calls") else USER
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        examples.append(Example(dialogue.skill, thinking, user, messages, prompt,
                                full[len(prompt):] + stop, dialogue.tools, expected))
    return tuple(examples)


def conversations(seed: int, split: str = "train", skill_weights: Mapping[str, float] | None = None,
                  ) -> Iterator[tuple[Example, ...]]:
    """An endless, reproducible stream of rendered conversations of one split; `skill_weights` overrides the
    default mix of SKILLS by name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(skill_weights or ()) - SKILLS.keys()
    if unknown:
        raise ValueError(f"unknown skills {sorted(unknown)}; the skills are {sorted(SKILLS)}")
    rng = random.Random(f"nano-corpus-{seed}")
    builders = [builder for builder, _ in SKILLS.values()]
    weights = [(skill_weights or {}).get(name, weight) for name, (_, weight) in SKILLS.items()]
    while True:
        builder = rng.choices(builders, weights)[0]
        thinking = rng.random() < 0.5
        dialogue = builder(rng, thinking)
        if any(map(is_heldout, dialogue.keys)) == (split == "heldout"):
            yield render(dialogue, thinking)


def examples(seed: int, count: int, split: str = "train") -> list[Example]:
    """The first `count` examples (assistant turns) of the stream."""
    return list(itertools.islice(itertools.chain.from_iterable(conversations(seed, split)), count))


def user_style_examples(seed: int, count: int) -> list[Example]:
    """`count` tool-call turns on tools a user writes (`dialogues.user_style_tool_dialogue`): realistic tools whose
    argument keys are all held out, so none of these conversations is ever in training."""
    rng, found = random.Random(f"nano-user-tools-{seed}"), []
    while len(found) < count:
        thinking = rng.random() < 0.5
        dialogue = user_style_tool_dialogue(rng, thinking)
        if not any(map(is_heldout, dialogue.keys)):
            raise AssertionError(f"a user-style conversation is not held out: {dialogue.keys}")
        found.append(render(dialogue, thinking)[0])
    return found
