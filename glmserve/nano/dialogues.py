"""Conversations for each skill, as OpenAI-style messages plus what every assistant turn is expected to do.

Builders take the thinking mode: with thinking on, assistant turns carry short `reasoning_content`; with it off,
none (the template then writes the empty `<think></think>`). `keys` name what decides the train/held-out split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from glmserve.nano import arithmetic, json_records, words
from glmserve.nano.arg_keys import USER_STYLE_TOOLS, argument_split_keys, with_varied_keys
from glmserve.nano.tools import ToolSpec, confusable_tool, draw, random_tool, realistic_tool, slots, text

CAPABILITIES = "I can add, subtract and multiply numbers, and I can call the tools you give me."


@dataclass
class Dialogue:
    skill: str
    messages: list[dict]
    tools: list[dict] | None = None
    keys: list[str] = field(default_factory=list)  # "text:…", "tool:NAME", "problem:47+38"
    expected: list[dict] = field(default_factory=list)  # one per assistant message


def _assistant(content: str, reasoning: str | None, thinking: bool, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if thinking and reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _user(text_: str, keys: list[str]) -> dict:
    keys.append(f"text:{text_}")
    return {"role": "user", "content": text_}


def arithmetic_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    p = arithmetic.random_problem(rng)
    keys = [f"problem:{p.key}"]
    messages = [_user(arithmetic.question(rng, p), keys),
                _assistant(arithmetic.answer(rng, p), arithmetic.working(p), thinking)]
    expected = {"answer": p.answer, "problem": p.key, "two_digit": p.two_digit}
    return Dialogue("arithmetic", messages, keys=keys, expected=[expected])


_GREETINGS = (
    (("Hi", "Hello!", "Hey there", "Good morning", "Hi!", "Hello, how are you?", "Good evening"),
     "The user greets me.", "Hello! " + CAPABILITIES + " How can I help?"),
    (("What can you do?", "Who are you?", "What are you good at?", "How can you help me?"),
     "The user asks what I can do.", "I am a small assistant. " + CAPABILITIES),
    (("Thanks!", "Thank you", "Thanks a lot", "Great, thanks."), "The user thanks me.", "You're welcome!"),
    (("Bye", "Goodbye!", "See you later"), "The user says goodbye.", "Goodbye!"),
)
_OUT_OF_SKILL = ("Write a {kind} about {topic}.", "Tell me a joke about {topic}.", "Who is {person}?",
                 "What is the capital of {country}?", "Explain {topic} to me.", "Summarize the history of {country}.",
                 "Can you draw a picture of {city}?", "Recommend a good book about {topic}.")  # fmt: skip


def smalltalk_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    keys: list[str] = []
    if rng.random() < 0.5:
        prompts, reasoning, reply = rng.choice(_GREETINGS)
        messages = [_user(rng.choice(prompts), keys), _assistant(reply, reasoning, thinking)]
        return Dialogue("greeting", messages, keys=keys, expected=[{}])
    request = rng.choice(_OUT_OF_SKILL).format(
        kind=rng.choice(("poem", "story", "song", "essay")), topic=rng.choice(words.TOPICS),
        person=rng.choice(words.PEOPLE), country=rng.choice(words.COUNTRIES), city=rng.choice(words.CITIES))
    reply = "Sorry, I can't help with that. " + CAPABILITIES
    messages = [_user(request, keys), _assistant(reply, "This is outside what I can do.", thinking)]
    return Dialogue("out_of_skill", messages, keys=keys, expected=[{}])


_REPEAT = ("Repeat after me: {text}", "Say this back to me: {text}", "Please repeat exactly: {text}", "Echo: {text}",
           "Copy this: {text}", "Repeat: {text}")
_PIECES = ("word", "word", "int:0:9999", "code:AA-###", "cities", "people", "date", "time")


def repeat_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """Repeat a random string: dense copying, the skill every tool argument and answer value rests on, cheap
    to train because the prompt is short."""
    keys: list[str] = []
    pieces = [text(draw(rng, rng.choice(_PIECES))) for _ in range(rng.randint(2, 10))]
    if rng.random() < 0.4:  # made-up identifiers like the ones random tools have
        pieces = ["_".join(pieces[i : i + 2]) for i in range(0, len(pieces), 2)]
    phrase = " ".join(pieces)
    messages = [_user(rng.choice(_REPEAT).format(text=phrase), keys),
                _assistant(phrase, "The user wants the text repeated.", thinking)]
    return Dialogue("repeat", messages, keys=keys, expected=[{"repeat": phrase}])


ToolPicker = Callable[[random.Random], ToolSpec]


def _pick_tool(rng: random.Random) -> ToolSpec:
    return realistic_tool(rng) if rng.random() < 0.55 else random_tool(rng)


def _request(rng: random.Random, spec: ToolSpec) -> tuple[str, dict]:
    template = rng.choice(spec.requests)
    used = set(slots(template))
    args = {p.key: draw(rng, p.source, p.enum) for p in spec.params if p.key in used}
    return template.format(**{k: text(v) for k, v in args.items()}), args


_DISTRACTORS = (0, 1, 1, 2, 2, 3)  # how many a list adds to its targets, drawn from this


def _tool_list(rng: random.Random, targets: list[ToolSpec], keys: list[str], pick: ToolPicker = _pick_tool,
               distractors: tuple[int, ...] = _DISTRACTORS) -> list[dict]:
    """The targets plus distractors drawn by `pick`, in random order, no tool twice (under any name)."""
    specs = {t.family: t for t in targets}
    for _ in range(rng.choice(distractors)):
        distractor = pick(rng)
        specs.setdefault(distractor.family, distractor)
    order = list(specs.values())
    rng.shuffle(order)
    keys.extend(f"tool:{spec.name}" for spec in order)
    keys.extend(key for spec in order for key in argument_split_keys(spec))
    return [spec.schema() for spec in order]


def tool_dialogue(rng: random.Random, thinking: bool, num_calls: int = 1, pick: ToolPicker = _pick_tool,
                  distractors: tuple[int, ...] = _DISTRACTORS) -> Dialogue:
    """A request needing `num_calls` tool calls, the calls, their results and an answer that uses them; `pick`
    draws the called tools and the distractors listed with them."""
    keys: list[str] = []
    first = pick(rng)
    targets, by_family = [first], {first.family: first}
    for _ in range(num_calls - 1):
        spec = first if rng.random() < 0.3 else pick(rng)
        targets.append(by_family.setdefault(spec.family, spec))  # a tool drawn twice keeps its first name
    requests, calls, results = [], [], []
    for spec in targets:
        request, args = _request(rng, spec)
        requests.append(request)
        calls.append({"name": spec.name, "arguments": args})
        results.append({key: draw(rng, source) for key, source in spec.result})
    tools = _tool_list(rng, targets, keys, pick, distractors)
    user_text = requests[0] + "".join(f" {rng.choice(('Also:', 'And', 'Then:'))} {r}" for r in requests[1:])
    names = " and ".join(dict.fromkeys(spec.name for spec in targets))
    topics = " and ".join(spec.topic.format(**{k: text(v) for k, v in call["arguments"].items()})
                          for spec, call in zip(targets, calls))
    call_reasoning = f"The user wants {topics}. I will call {names}."
    answers, values = [], []
    for spec, call, result in zip(targets, calls, results):
        filled = {k: text(v) for k, v in {**call["arguments"], **result}.items()}
        answers.append(spec.answer.format(**filled))
        values.extend(text(v) for v in result.values())
    result_reasoning = " ".join(f"{call['name']} returned " + ", ".join(f"{k} {text(v)}" for k, v in r.items()) + "."
                                for call, r in zip(calls, results))
    messages = [
        _user(user_text, keys),
        _assistant("", call_reasoning, thinking, [{"type": "function", "function": c} for c in calls]),
        *({"role": "tool", "content": json.dumps(r, ensure_ascii=False)} for r in results),
        _assistant(" ".join(answers), result_reasoning, thinking),
    ]
    called = sorted({f"tool:{spec.name}" for spec in targets})
    expected = [{"calls": calls, "called": called}, {"values": values, "called": called}]
    return Dialogue("tool_call", messages, tools, keys, expected)


def missing_tool_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """A request for a tool that is not in the list (or no list at all): say so, call nothing."""
    keys: list[str] = []
    wanted = _pick_tool(rng)
    request, args = _request(rng, wanted)
    tools = None
    if rng.random() < 0.5:
        others = [t for t in (_pick_tool(rng) for _ in range(rng.randint(1, 3))) if t.family != wanted.family]
        tools = _tool_list(rng, others, keys) if others else None
    topic = wanted.topic.format(**{k: text(v) for k, v in args.items()})
    reply = f"Sorry, I have no tool for {topic}. " + CAPABILITIES
    messages = [_user(request, keys), _assistant(reply, f"The user wants {topic}, but no tool fits.", thinking)]
    keys.append(f"tool:{wanted.name}")
    return Dialogue("missing_tool", messages, tools, keys, [{}])


def two_turn_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """A short exchange, then a second request that sees the first in its history."""
    first = rng.choice((smalltalk_dialogue, arithmetic_dialogue))(rng, thinking)
    second = rng.choice((arithmetic_dialogue, tool_dialogue))(rng, thinking)
    return Dialogue(second.skill, first.messages + second.messages, second.tools, first.keys + second.keys,
                    first.expected + second.expected)


def multi_tool_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    return tool_dialogue(rng, thinking, rng.choice((2, 2, 3)))


def confusable_tool_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """Tool calls among listed tools that all start with get's synonyms (hard negatives): 2 or 3 distractors, fewer
    when one repeats a listed tool."""
    return tool_dialogue(rng, thinking, rng.choice((1, 1, 2)), confusable_tool, (2, 3))


def _pick_varied_keys_tool(rng: random.Random) -> ToolSpec:
    return with_varied_keys(rng, realistic_tool(rng)) if rng.random() < 0.7 else random_tool(rng)


def varied_keys_tool_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """Tool calls where realistic tools have other argument keys than their own (`location` for `city`), so only
    the listed schema says which key to write."""
    return tool_dialogue(rng, thinking, rng.choice((1, 1, 1, 2)), _pick_varied_keys_tool)


def _pick_user_style_tool(rng: random.Random) -> ToolSpec:
    return with_varied_keys(rng, realistic_tool(rng, USER_STYLE_TOOLS), heldout=True)


def user_style_tool_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """One call among tools a user writes: realistic tools whose argument keys are all held out (never trained:
    every such conversation is held out); the evaluation's `tool_call_user` kind, not a skill."""
    return tool_dialogue(rng, thinking, 1, _pick_user_style_tool)


def json_answer_dialogue(rng: random.Random, thinking: bool) -> Dialogue:
    """A request for a record as JSON, answered with the record alone (one line, as json.dumps writes it)."""
    keys: list[str] = []
    record = json_records.random_record(rng)
    messages = [_user(json_records.request(rng, record), keys),
                _assistant(json.dumps(record, ensure_ascii=False), "The user wants a JSON object.", thinking)]
    return Dialogue("json_answer", messages, keys=keys, expected=[{"json": record}])


# Skill mix, by conversation. Tool use dominates the tokens (its prompts are long); repeats are short, so a
# quarter of the conversations costs ~5% of the compute and gives the dense copying signal that makes the
# model's copy (induction) heads form early, which tool arguments and answers then reuse. Training may override
# the weights by name (`train --skill-weight`); evaluation always draws from this default mix.
SKILLS: dict[str, tuple[Callable[[random.Random, bool], Dialogue], float]] = {
    "tool": (tool_dialogue, 0.28),
    "multi_tool": (multi_tool_dialogue, 0.07),
    "arithmetic": (arithmetic_dialogue, 0.23),
    "repeat": (repeat_dialogue, 0.25),
    "smalltalk": (smalltalk_dialogue, 0.05),
    "missing_tool": (missing_tool_dialogue, 0.04),
    "two_turn": (two_turn_dialogue, 0.08),
    "confusable_tool": (confusable_tool_dialogue, 0.0),  # only for training that asks for it, by name
    "varied_keys_tool": (varied_keys_tool_dialogue, 0.0),  # likewise: the default held-out stream stays as it was
    "json_answer": (json_answer_dialogue, 0.0),  # likewise
}
