"""Random JSON records and the requests that ask for them, for the `json_answer` skill.

A grammar can hold an answer to a JSON schema, but only the model can end a free string: without JSON answers in its
corpus, the embedded model opened `"name": "` under the grammar and wrote prose into it until `max_tokens`
(README, structured output). Records here are short objects of the value kinds schemas use (strings from the
corpus's pools, numbers, booleans, null, arrays, nested objects), under common, made-up and single-letter keys.
"""

from __future__ import annotations

import random

from glmserve.nano import words
from glmserve.nano.tools import draw

_COMMON_KEYS = ("name", "email", "city", "country", "title", "id", "label", "note", "status", "type", "value", "code",
                "date", "time", "owner", "team", "topic", "tags", "items", "count", "price", "age", "score", "level",
                "active", "enabled", "meta", "info", "address", "street", "zip", "language", "song", "task", "amount",
                "description", "key", "kind", "result", "comment")  # fmt: skip
_LETTERS = "abcdefghijkmnpqrstuvwxyz"
# Keys whose value is always an address: a schema's `"format": "email"` string opens the same way, and without
# enough of them the model began such a string with a word and never wrote the `@` (BENCHMARKS.md, free strings).
_EMAIL_KEYS = ("email", "contact_email", "userEmail", "mail", "owner_email")
# What a known key's string values are drawn from, where the key says; other strings come from any of these.
_KEY_SOURCES = {"name": "people", "owner": "people", "city": "cities", "address": "cities",
                "country": "countries", "title": "titles", "task": "tasks", "status": "statuses", "team": "teams",
                "topic": "topics", "song": "songs", "language": "languages", "date": "date", "time": "time",
                "code": "code:AA-###", "id": "code:AAA###"}  # fmt: skip
_STRING_SOURCES = ("people", "cities", "countries", "titles", "tasks", "statuses", "teams", "topics", "songs",
                   "languages", "cuisines", "ingredients", "conditions", "word", "email", "date", "time",
                   "code:AA-###")  # fmt: skip
_KINDS = ("string",) * 10 + ("integer",) * 3 + ("number", "boolean", "null", "array", "object")


def random_key(rng: random.Random) -> str:
    """A property name: common (`name`, `email`), a single letter, or made up in snake or camel case."""
    roll = rng.random()
    if roll < 0.1:
        return rng.choice(_EMAIL_KEYS)
    if roll < 0.55:
        return rng.choice(_COMMON_KEYS)
    if roll < 0.7:
        return rng.choice(_LETTERS)
    first, second = words.nonsense(rng), rng.choice(words.KEY_SUFFIXES)
    return rng.choice((first, f"{first}_{second}", first + second.capitalize()))


def _string(rng: random.Random, key: str) -> str:
    if key in _EMAIL_KEYS:
        return str(draw(rng, "email"))
    source = _KEY_SOURCES.get(key) if rng.random() < 0.8 else None
    return str(draw(rng, source or rng.choice(_STRING_SOURCES)))


def random_value(rng: random.Random, key: str, depth: int) -> object:
    kind = rng.choice(_KINDS if depth < 2 else _KINDS[:-1])
    if kind == "string" or key in _EMAIL_KEYS or key in _KEY_SOURCES and rng.random() < 0.7:
        return _string(rng, key)
    if kind == "integer":
        return int(draw(rng, rng.choice(("int:0:100", "int:-1000:1000", "int:0:99999"))))
    if kind == "number":
        return draw(rng, "num:-500:500")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        item = rng.choice(("string", "integer"))
        return [_string(rng, key) if item == "string" else rng.randint(0, 999) for _ in range(rng.randint(0, 3))]
    return random_record(rng, depth + 1, rng.randint(1, 3))


def random_record(rng: random.Random, depth: int = 0, size: int | None = None) -> dict:
    """An object of `size` (default 1-4) distinct keys; values nest two objects deep at most."""
    record: dict = {}
    for _ in range(size if size is not None else rng.randint(1, 4)):
        key = random_key(rng)
        if key not in record:
            record[key] = random_value(rng, key, depth)
    return record


def _key_list(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


_OPEN_REQUESTS = ("Show me a sample record in JSON.", "Reply in JSON only.", "Return JSON only.",
                  "Make up a {topic} record as a JSON object.", "Write an example {noun} in JSON.",
                  "Answer in JSON: a record about {topic}.", "Give me some data as a JSON object.",
                  "Generate a random JSON record.", "Print a {noun} as JSON.")  # fmt: skip
_KEYED_REQUESTS = ("Give me a JSON object with {keys}.", "Output a JSON object with {keys}.",
                   "I need a JSON record with {keys}.", "Make a {noun} in JSON with {keys}.",
                   "Return JSON with {keys}.")  # fmt: skip


def request(rng: random.Random, record: dict) -> str:
    """What a user says to get `record`: half the time naming its keys, else an open request."""
    fill = {"topic": rng.choice(words.TOPICS), "noun": rng.choice(words.NOUNS), "keys": _key_list(list(record))}
    return rng.choice(_KEYED_REQUESTS if rng.random() < 0.5 else _OPEN_REQUESTS).format(**fill)
