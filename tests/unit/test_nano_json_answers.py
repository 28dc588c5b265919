"""The json_answer skill: requests for a record as JSON, answered with exactly that record (strings that end, keys the
request names), rendered through GLM-4.5's template, and absent from the default mix (held-out sets unchanged)."""

import itertools
import json
import random

from glmserve.nano import json_records
from glmserve.nano.corpus import USER, conversations
from glmserve.nano.dialogues import SKILLS, json_answer_dialogue
from glmserve.serving.parsers.glm45 import parse_output

ONLY_JSON = {name: 0.0 for name in SKILLS} | {"json_answer": 1.0}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return list(value) + [s for item in value.values() for s in _strings(item)]
    return []


def test_records_have_every_value_kind_and_short_strings():
    rng = random.Random(0)
    records = [json_records.random_record(rng) for _ in range(500)]
    kinds = {type(v).__name__ for r in records for v in r.values()}
    assert kinds == {"str", "int", "float", "bool", "NoneType", "list", "dict"}
    assert all(1 <= len(r) <= 4 for r in records)
    strings = [s for r in records for s in _strings(r)]
    assert max(len(s) for s in strings) <= 40 and all(strings)
    keys = {k for r in records for k in r}
    assert {"name", "email", "a", "k"} <= keys and len(keys) > 300  # common, single letters and made up
    addresses = [r[k] for r in records for k in r if k in json_records._EMAIL_KEYS]
    assert len(addresses) > 50 and all(isinstance(a, str) and "@" in a for a in addresses)


def test_a_request_that_names_keys_names_exactly_the_records():
    rng = random.Random(1)
    named = 0
    for _ in range(300):
        dialogue = json_answer_dialogue(rng, rng.random() < 0.5)
        request, answer = dialogue.messages[0]["content"], dialogue.messages[1]["content"]
        record = json.loads(answer)
        assert record == dialogue.expected[0]["json"]
        if " with " in request:
            named += 1
            listed = request.rsplit(" with ", 1)[1].removesuffix(".").replace(" and ", ", ").split(", ")
            assert listed == list(record)
    assert 100 < named < 200


def test_the_training_stream_renders_answers_the_parser_reads_back_as_the_record():
    examples = [e for c in itertools.islice(conversations(5, "train", ONLY_JSON), 200) for e in c]
    assert len(examples) == 200 and {e.thinking for e in examples} == {True, False}
    for e in examples:
        _, content, calls = parse_output(e.completion.removesuffix(USER), None, e.thinking)
        assert not calls and json.loads(content) == e.expected["json"]


def test_the_default_mix_has_no_json_answers():
    assert SKILLS["json_answer"][1] == 0.0
    examples = [e for c in itertools.islice(conversations(5, "train"), 400) for e in c]
    assert not any("json" in e.expected for e in examples)
