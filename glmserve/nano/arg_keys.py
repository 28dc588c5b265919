"""Argument keys of realistic tools under other names, as their tool names already are (`tools.name_variants`).

A realistic tool's parameter (`city`) is served under synonyms in snake_case, camelCase and PascalCase
(`location`, `cityName`, `Place`, ...), so a request for the weather does not tell the model which key to write:
only the listed schema does. Keys are held out as tool names are: a variant whose `argkey:` hashes into the
held-out bucket never reaches training, and tools a user writes (realistic tools under held-out keys) measure
whether the model reads keys from the schema (`evaluate --kinds tool_call_user`).
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from functools import cache

from glmserve.nano import words
from glmserve.nano.split import is_heldout
from glmserve.nano.tools import REALISTIC_TOOLS, ToolSpec

# Synonyms of each realistic parameter, as space-separated words (each written in three casings); the
# parameter's own key comes first. Within one tool no two parameters share a variant, and none is a result key
# (a test checks).
# fmt: off
KEY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "city": ("city", "city name", "location", "place", "town", "locality", "municipality", "area"),
    "unit": ("unit", "units", "temperature unit", "temp unit", "scale", "unit system", "degrees"),
    "amount": ("amount", "sum", "quantity", "money", "amount value", "total", "how much"),
    "from_currency": ("from currency", "source currency", "from", "currency from", "sell currency",
                      "original currency", "source"),
    "to_currency": ("to currency", "target currency", "to", "currency to", "buy currency", "destination currency",
                    "target"),
    "origin": ("origin", "from", "start", "departure", "from city", "departure city", "start location",
               "origin city"),
    "destination": ("destination", "to", "end", "arrival", "to city", "arrival city", "end location",
                    "destination city"),
    "date": ("date", "day", "on date", "date string", "scheduled date", "start date", "event day"),
    "title": ("title", "name", "event name", "event title", "summary", "label", "heading"),
    "time": ("time", "start time", "at", "hour", "clock time", "time of day", "when", "at time"),
    "symbol": ("symbol", "ticker", "stock symbol", "ticker symbol", "stock", "stock code", "instrument"),
    "to": ("to", "recipient", "email", "to address", "recipient email", "address", "email address", "send to"),
    "subject": ("subject", "topic", "title", "subject line", "about", "headline", "email subject"),
    "minutes": ("minutes", "duration", "duration minutes", "length", "mins", "timer minutes", "length minutes"),
    "text": ("text", "content", "message", "input", "phrase", "body", "text input", "note"),
    "target_language": ("target language", "language", "to language", "target lang", "lang", "output language",
                        "translate to"),
    "cuisine": ("cuisine", "food type", "food", "cuisine type", "kind", "style", "category", "dish type"),
    "nights": ("nights", "num nights", "number of nights", "stay nights", "nights count", "length of stay",
               "stay length"),
    "guests": ("guests", "num guests", "number of guests", "people", "adults", "guest count", "occupancy",
               "persons"),
    "topic": ("topic", "category", "subject", "section", "keyword", "query", "news topic", "theme"),
    "mode": ("mode", "travel mode", "transport", "transport mode", "by", "method", "means", "mode of travel"),
    "task": ("task", "item", "todo", "title", "description", "text", "task name", "what"),
    "due_date": ("due date", "due", "deadline", "date", "by date", "due on", "due by", "finish by"),
    "order_id": ("order id", "order", "order number", "id", "order no", "reference", "order ref"),
    "movie": ("movie", "film", "title", "movie title", "film name", "movie name", "show", "picture"),
    "bill_amount": ("bill amount", "bill", "amount", "total", "bill total", "subtotal", "check amount"),
    "percent": ("percent", "percentage", "tip percent", "rate", "tip rate", "pct", "tip percentage"),
    "country": ("country", "nation", "country name", "place", "location", "region", "land"),
    "value": ("value", "amount", "quantity", "number", "measurement", "input value", "qty", "magnitude"),
    "from_unit": ("from unit", "source unit", "from", "unit from", "input unit", "original unit", "convert from"),
    "to_unit": ("to unit", "target unit", "to", "unit to", "output unit", "desired unit", "convert to"),
    "tracking_number": ("tracking number", "tracking id", "tracking", "tracking code", "parcel id", "package id",
                        "shipment id"),
    "ingredient": ("ingredient", "main ingredient", "food", "item", "contains", "with ingredient",
                   "key ingredient", "base ingredient"),
    "max_minutes": ("max minutes", "max time", "time limit", "max mins", "max duration", "cook time",
                    "within minutes", "limit minutes"),
    "team": ("team", "team name", "club", "side", "squad", "name", "franchise"),
    "base": ("base", "from", "base currency", "from currency", "source", "source currency", "sell"),
    "quote": ("quote", "to", "quote currency", "to currency", "target", "target currency", "counter currency"),
    "restaurant": ("restaurant", "restaurant name", "venue", "place", "name", "establishment", "spot"),
    "party_size": ("party size", "guests", "people", "seats", "covers", "number of people", "party", "persons"),
    "song": ("song", "track", "title", "song name", "track name", "song title", "tune", "music"),
}
# fmt: on

CANONICAL_KEYS = frozenset(p.key for spec in REALISTIC_TOOLS for p in spec.params)
_NONSENSE = re.compile(r"(?:(?:br|kr|st|tr|pl|sh|[bdfgklmnprstvz])(?:ai|ou|[aeiou])[nrxmlk]?)+")


def _cased(phrase: str) -> tuple[str, ...]:
    first, *rest = phrase.split()
    return ("_".join([first, *rest]), first + "".join(w.capitalize() for w in rest),
            "".join(w.capitalize() for w in [first, *rest]))


@cache
def key_variants(key: str) -> tuple[str, ...]:
    """A parameter's keys: its own first, then every synonym in snake_case, camelCase and PascalCase."""
    return tuple(dict.fromkeys([key, *(v for phrase in KEY_SYNONYMS[key] for v in _cased(phrase))]))


def random_tools_may_use(key: str) -> bool:
    """Whether `tools.random_tool` can draw `key` (a noun or nonsense word, maybe with a suffix): such keys are in
    training anyway and are never held out."""
    base, sep, suffix = key.rpartition("_")
    if not (sep and suffix in words.KEY_SUFFIXES):
        base = key
    return base in words.NOUNS or _NONSENSE.fullmatch(base) is not None


def split_key(key: str) -> str | None:
    """The split key (`argkey:...`) that decides where a variant goes; None for keys every split may use (the
    parameters' own keys, and keys random tools may draw)."""
    if key in CANONICAL_KEYS or random_tools_may_use(key):
        return None
    return f"argkey:{key}"


def heldout_variants(key: str) -> tuple[str, ...]:
    return tuple(v for v in key_variants(key) if (s := split_key(v)) is not None and is_heldout(s))


# Realistic tools a user may write: every parameter has a held-out variant.
USER_STYLE_TOOLS = tuple(spec for spec in REALISTIC_TOOLS if all(heldout_variants(p.key) for p in spec.params))


def _renamed_slots(template: str, mapping: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "{" + mapping.get(m[1], m[1]) + "}", template)


def rename_keys(spec: ToolSpec, mapping: dict[str, str]) -> ToolSpec:
    """`spec` with its parameters' keys renamed by `mapping` (requests, answer and topic slots too)."""
    return replace(spec, params=tuple(replace(p, key=mapping.get(p.key, p.key)) for p in spec.params),
                   required=tuple(mapping.get(k, k) for k in spec.required),
                   requests=tuple(_renamed_slots(r, mapping) for r in spec.requests),
                   answer=_renamed_slots(spec.answer, mapping), topic=_renamed_slots(spec.topic, mapping))


def with_varied_keys(rng: random.Random, spec: ToolSpec, heldout: bool = False) -> ToolSpec:
    """`spec` under a variant of each parameter's key: any variant, or (`heldout`) held-out ones only."""
    mapping = {p.key: rng.choice(heldout_variants(p.key) if heldout else key_variants(p.key)) for p in spec.params}
    return rename_keys(spec, mapping)


def argument_split_keys(spec: ToolSpec) -> list[str]:
    """The split keys of a listed tool's argument keys (a dialogue's `keys` carry them)."""
    return [s for p in spec.params if (s := split_key(p.key)) is not None]
