"""Cases for structured-output tests and benchmarks: JSON schemas of varied features, and generated tool sets.

Every schema here compiles with xgrammar and uses only keywords it enforces (serving/structured_output.py refuses
the others), so an output that parses and validates against it with `jsonschema` is what the grammar promises.
"""

from __future__ import annotations

import random

# Numbers are bounded: a grammar cannot make a model end an unbounded integer, and random weights (the tests'
# case where nothing but the grammar can produce valid JSON) happily write digits until max_tokens.
_SMALL_INT = {"type": "integer", "minimum": -1000, "maximum": 1000}
_ADDRESS = {"type": "object", "properties": {"street": {"type": "string", "maxLength": 30},
                                             "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"]}

JSON_SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}}, "required": ["ok", "note"]},
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -5.5, "maximum": 5.5}}, "required": ["t"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"mode": {"const": "fast"}, "x": _SMALL_INT}, "required": ["mode", "x"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                       "maximum": 9}, "minItems": 2, "maxItems": 2}},
     "required": ["xs"]},
    {"type": "object", "properties": {"a": {"type": "string"}, "b": _SMALL_INT}, "required": ["a"]},
    {"type": "object", "properties": {"a": _SMALL_INT, "b": _SMALL_INT, "c": _SMALL_INT},
     "required": ["b"]},
    {"type": "object", "properties": {"addr": _ADDRESS}, "required": ["addr"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 10**6}, "profile": {"type": "object", "properties": {
            "nick": {"type": "string", "minLength": 1, "maxLength": 12}}, "required": ["nick"]}},
        "required": ["id", "profile"]}}, "required": ["user"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": _SMALL_INT, "y": _SMALL_INT},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
     "required": ["from", "to"]},
    {"definitions": {"unit": {"enum": ["kg", "lb"]}}, "type": "object",
     "properties": {"w": {"type": "number", "minimum": 0, "maximum": 500}, "u": {"$ref": "#/definitions/unit"}}, "required": ["w", "u"]},
    {"type": "object", "properties": {"id": {"anyOf": [_SMALL_INT, {"type": "string", "maxLength": 6}]}},
     "required": ["id"]},
    {"type": "object", "properties": {"v": {"type": ["string", "null"]}}, "required": ["v"]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-f0-9]{4}-[a-f0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 5}}, "required": ["word"]},
    {"type": "object", "additionalProperties": False, "properties": {"k": {"type": "string"}}, "required": ["k"]},
    {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3}, "minItems": 1, "maxItems": 4},
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 5}, _SMALL_INT], "items": False,
     "minItems": 2},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "boolean"},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 1}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"opt": {"type": "object", "properties": {"flag": {"type": "boolean"}}},
                                      "id": _SMALL_INT}, "required": ["id"]},
    {"type": "object", "properties": {"meta": {"type": "object", "maxProperties": 2,
                                               "additionalProperties": _SMALL_INT}}, "required": ["meta"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": _SMALL_INT,
                                      "owner": {"type": "object", "properties": {"name": {"type": "string",
                                                                                          "maxLength": 10}},
                                                "required": ["name"]}},
     "required": ["status", "count", "owner"]},
]

_WORDS = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "sierra", "tango", "zulu", "quill", "maple", "ember"]


def _name(rng: random.Random, style: str) -> str:
    parts = rng.sample(_WORDS, 2)
    return parts[0] + parts[1].capitalize() if style == "camel" else "_".join(parts)


def _value_schema(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 1 else []))
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["low", "mid", "high", "max", "off"], 3)}
    if kind == "integer":
        low = rng.randint(-5, 5)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 50)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 100}
    if kind == "array":
        return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}
    if kind == "object":
        return _object_schema(rng, depth + 1, 2)
    if kind == "string":
        return {"type": "string", "maxLength": 20}
    return {"type": kind}


def _object_schema(rng: random.Random, depth: int, max_props: int) -> dict:
    style = rng.choice(["snake", "camel"])
    props = {}
    while len(props) < rng.randint(1, max_props):
        props[_name(rng, style)] = _value_schema(rng, depth)
    required = [k for k in props if rng.random() < 0.6] or [next(iter(props))]
    return {"type": "object", "properties": props, "required": required}


def random_tools(seed: int, count: int = 3) -> list[dict]:
    """`count` OpenAI tools with random names and argument keys (never the embedded model's corpus's), of random
    types: strings, bounded numbers, booleans, enums, arrays and nested objects; some optional."""
    rng = random.Random(seed)
    tools, names = [], set()
    while len(tools) < count:
        name = _name(rng, rng.choice(["snake", "camel"])) + f"_{rng.randint(0, 99)}"
        if name in names:
            continue
        names.add(name)
        tools.append({"type": "function", "function": {"name": name, "description": f"Tool {name}.",
                                                       "parameters": _object_schema(rng, 0, 3)}})
    return tools
