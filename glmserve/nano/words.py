"""Word pools the corpus draws values from. Plain data: many values per slot so the model must copy, not recall."""

from __future__ import annotations

import random

CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin", "Oslo",
    "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul", "Cairo",
    "Nairobi", "Lagos", "Cape Town", "Dubai", "Mumbai", "Delhi", "Bangkok", "Singapore", "Jakarta", "Manila",
    "Seoul", "Tokyo", "Osaka", "Beijing", "Shanghai", "Hong Kong", "Taipei", "Sydney", "Melbourne", "Auckland",
    "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver", "Austin", "Miami", "New York",
    "Los Angeles", "San Francisco", "Mexico City", "Lima", "Bogota", "Santiago", "Buenos Aires", "Sao Paulo",
    "Reykjavik", "Edinburgh", "Munich", "Hamburg", "Lyon", "Milan", "Naples", "Porto", "Krakow", "Budapest",
)  # fmt: skip
COUNTRIES = (
    "France", "Germany", "Spain", "Italy", "Japan", "China", "India", "Brazil", "Canada", "Mexico", "Kenya",
    "Egypt", "Norway", "Sweden", "Poland", "Greece", "Turkey", "Chile", "Peru", "Vietnam", "Thailand", "Ireland",
    "Portugal", "Austria", "Nigeria", "Argentina", "Australia", "Finland", "Iceland", "Morocco",
)  # fmt: skip
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CNY", "CHF", "CAD", "AUD", "INR", "BRL", "SEK", "NOK", "KRW", "MXN")
LANGUAGES = ("French", "German", "Spanish", "Italian", "Japanese", "Chinese", "Korean", "Dutch", "Swedish")
PEOPLE = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Karen", "Leo", "Maria",
    "Nora", "Oscar", "Paula", "Quinn", "Ravi", "Sofia", "Tom", "Uma", "Victor", "Wendy", "Xavier", "Yuki", "Zoe",
)  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear")
CUISINES = ("Italian", "Thai", "Mexican", "Indian", "Japanese", "Greek", "Korean", "French", "vegan")
INGREDIENTS = ("chicken", "rice", "tomato", "potato", "salmon", "tofu", "lentils", "mushroom", "spinach", "egg")
TOPICS = ("science", "sports", "music", "travel", "health", "business", "technology", "art", "space", "climate")
TEAMS = ("Lions", "Tigers", "Eagles", "Sharks", "Wolves", "Bears", "Falcons", "Rangers", "Comets", "Rockets")
UNITS = ("km", "miles", "kg", "pounds", "liters", "gallons", "meters", "feet")
TITLES = ("team meeting", "dentist", "lunch with Maria", "yoga class", "project review", "birthday party",
          "call with Bob", "flight check-in", "book club", "piano lesson")  # fmt: skip
TASKS = ("buy milk", "pay rent", "call mom", "water the plants", "renew passport", "clean the garage",
         "send the report", "book a doctor visit", "fix the bike", "read chapter 3")  # fmt: skip
SONGS = ("Blue Sky", "Night Drive", "Golden Hour", "Paper Moon", "River Song", "Summer Rain", "Old Town")
STATUSES = ("shipped", "delivered", "processing", "in transit", "delayed")
LEVELS = ("good", "moderate", "poor", "unhealthy")

# Random tools mix real words with pronounceable nonsense so their names cannot be memorised.
VERBS = ("get", "fetch", "list", "find", "check", "create", "update", "delete", "compute", "lookup", "scan",
         "sync", "validate", "query", "reset", "count", "measure", "resolve", "archive", "register", "start",
         "stop", "open", "rank", "score", "merge", "export", "import", "render", "estimate")  # fmt: skip
NOUNS = ("record", "status", "level", "report", "account", "device", "order", "ticket", "user", "file", "task",
         "sensor", "balance", "price", "route", "badge", "batch", "queue", "score", "profile", "invoice", "signal",
         "window", "channel", "token", "region", "stock", "quota", "shelf", "garden")  # fmt: skip
KEY_SUFFIXES = ("id", "name", "count", "level", "mode", "code", "size", "limit", "type", "label")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "tr", "pl", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "x", "m", "l", "k")


def nonsense(rng: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word, e.g. 'zarnok'."""
    n = syllables or rng.choice((1, 2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))


def code(rng: random.Random, pattern: str) -> str:
    """'A' → a capital letter, '#' → a digit, anything else as is: code(rng, 'AA-###') → 'KQ-381'."""
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") if c == "A" else str(rng.randrange(10)) if c == "#" else c
                   for c in pattern)
