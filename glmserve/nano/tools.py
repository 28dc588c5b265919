"""Tools for the corpus: a pool of realistic schemas and a generator of random ones, in one shape (`ToolSpec`).

A spec knows its OpenAI schema, how users ask for it (request templates whose `{key}` slots are its parameters),
what it returns, and how an answer states the result. Random tools have made-up names, keys and values, and
their requests spell the keys out, so the model must copy from the prompt rather than recall.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, replace

from glmserve.nano import words


@dataclass(frozen=True)
class Param:
    key: str
    type: str  # JSON schema type: string, integer, number, boolean
    description: str
    source: str  # what values look like, see `draw`
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    params: tuple[Param, ...]
    required: tuple[str, ...]
    requests: tuple[str, ...]  # user phrasings; `{key}` slots are filled with argument values
    result: tuple[tuple[str, str], ...]  # (result key, value source)
    answer: str  # the final answer; slots: argument keys and result keys
    topic: str  # what the user wants, for the reasoning ("the weather in {city}")
    family: str = ""  # tools that do the same thing under other names share it (a list never holds two)

    def schema(self) -> dict:
        """The OpenAI tool object a request lists (and the template prints as one JSON line)."""
        properties = {}
        for p in self.params:
            prop = {"type": p.type, "description": p.description}
            if p.enum:
                prop["enum"] = list(p.enum)
            properties[p.key] = prop
        parameters = {"type": "object", "properties": properties, "required": list(self.required)}
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": parameters}}


def draw(rng: random.Random, source: str, enum: tuple[str, ...] = ()) -> object:
    """A value: a pool name from `words` (lower case), 'int:LO:HI', 'num:LO:HI', 'code:PATTERN', 'date', 'time',
    'email', 'bool', 'word' (made up) or 'enum' (one of `enum`)."""
    kind, _, arg = source.partition(":")
    if kind == "int":
        lo, hi = map(int, arg.split(":"))
        return rng.randint(lo, hi)
    if kind == "num":
        lo, hi = map(int, arg.split(":"))
        return round(rng.uniform(lo, hi), rng.choice((1, 2)))
    if kind == "code":
        return words.code(rng, arg)
    if kind == "date":
        return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == "time":
        return f"{rng.randint(6, 22):02d}:{rng.choice(('00', '15', '30', '45'))}"
    if kind == "email":
        return f"{rng.choice(words.PEOPLE).lower()}@{words.nonsense(rng, 2)}.com"
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "word":
        return words.nonsense(rng)
    if kind == "enum":
        return rng.choice(enum)
    return rng.choice(getattr(words, kind.upper()))


def text(value: object) -> str:
    """How a value appears in prompts and answers: strings as is, anything else as the JSON the template writes."""
    return value if isinstance(value, str) else json.dumps(value)


def slots(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _p(key: str, type_: str, description: str, source: str, enum: tuple[str, ...] = ()) -> Param:
    return Param(key, type_, description, "enum" if enum else source, enum)


def _tool(name, description, params, requests, result, answer, topic, required=None) -> ToolSpec:
    required = tuple(required if required is not None else (p.key for p in params))
    return ToolSpec(name, description, tuple(params), required, tuple(requests), tuple(result), answer, topic, name)


# fmt: off
REALISTIC_TOOLS: tuple[ToolSpec, ...] = (
    _tool("get_weather", "Get the current weather for a city",
          [_p("city", "string", "City name", "cities"),
           _p("unit", "string", "Temperature unit", "", ("celsius", "fahrenheit"))],
          ["What's the weather in {city}?", "How is the weather in {city} today?", "Is it cold in {city}?",
           "Weather in {city} in {unit}, please.", "Tell me the weather for {city}."],
          [("temperature", "int:-10:38"), ("condition", "conditions")],
          "It is {condition} in {city} with a temperature of {temperature} degrees.", "the weather in {city}",
          required=["city"]),
    _tool("convert_currency", "Convert an amount of money from one currency to another",
          [_p("amount", "number", "Amount to convert", "num:1:5000"),
           _p("from_currency", "string", "Currency code to convert from", "currencies"),
           _p("to_currency", "string", "Currency code to convert to", "currencies")],
          ["Convert {amount} {from_currency} to {to_currency}.",
           "How much is {amount} {from_currency} in {to_currency}?",
           "I have {amount} {from_currency}. What is that in {to_currency}?"],
          [("converted_amount", "num:1:9000")],
          "{amount} {from_currency} is {converted_amount} {to_currency}.",
          "to convert {from_currency} to {to_currency}"),
    _tool("search_flights", "Search flights between two cities on a date",
          [_p("origin", "string", "Departure city", "cities"), _p("destination", "string", "Arrival city", "cities"),
           _p("date", "string", "Travel date, YYYY-MM-DD", "date")],
          ["Find me a flight from {origin} to {destination} on {date}.",
           "Are there flights from {origin} to {destination} on {date}?",
           "I need to fly {origin} to {destination}, {date}."],
          [("flight", "code:AA###"), ("price", "int:60:1500")],
          "Flight {flight} from {origin} to {destination} on {date} costs {price} dollars.",
          "a flight from {origin} to {destination}"),
    _tool("create_calendar_event", "Add an event to the user's calendar",
          [_p("title", "string", "Event title", "titles"), _p("date", "string", "Date, YYYY-MM-DD", "date"),
           _p("time", "string", "Start time, HH:MM", "time")],
          ["Add {title} to my calendar on {date} at {time}.", "Schedule {title} for {date} at {time}.",
           "Put {title} in my calendar, {date} {time}."],
          [("event_id", "code:EV-####")],
          "I added {title} on {date} at {time}. The event id is {event_id}.", "a calendar event for {title}"),
    _tool("get_stock_price", "Get the latest stock price for a ticker symbol",
          [_p("symbol", "string", "Ticker symbol", "code:AAAA")],
          ["What is the stock price of {symbol}?", "How much is {symbol} trading at?", "Quote for {symbol}?"],
          [("price", "num:5:900")],
          "{symbol} is trading at {price}.", "the price of {symbol}"),
    _tool("send_email", "Send an email",
          [_p("to", "string", "Recipient address", "email"), _p("subject", "string", "Subject line", "titles")],
          ["Send an email to {to} about {subject}.", "Email {to} with the subject {subject}."],
          [("message_id", "code:MSG-#####")],
          "The email to {to} was sent. Message id {message_id}.", "to email {to}"),
    _tool("set_timer", "Start a countdown timer",
          [_p("minutes", "integer", "Length in minutes", "int:1:120")],
          ["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.", "Timer, {minutes} minutes please."],
          [("timer_id", "code:T-###")],
          "Your {minutes} minute timer is running (id {timer_id}).", "a {minutes} minute timer"),
    _tool("translate_text", "Translate a word or phrase into another language",
          [_p("text", "string", "Text to translate", "tasks"),
           _p("target_language", "string", "Language to translate into", "languages")],
          ["Translate '{text}' into {target_language}.", "How do you say {text} in {target_language}?"],
          [("translation", "word")],
          "In {target_language}, '{text}' is '{translation}'.", "a translation into {target_language}"),
    _tool("get_local_time", "Get the current local time in a city",
          [_p("city", "string", "City name", "cities")],
          ["What time is it in {city}?", "Current time in {city}?", "Tell me the local time in {city}."],
          [("time", "time")],
          "It is {time} in {city}.", "the time in {city}"),
    _tool("search_restaurants", "Find restaurants in a city",
          [_p("city", "string", "City name", "cities"), _p("cuisine", "string", "Type of food", "cuisines")],
          ["Find a {cuisine} restaurant in {city}.", "Any good {cuisine} places in {city}?",
           "I want {cuisine} food in {city}."],
          [("restaurant", "word"), ("rating", "num:1:5")],
          "{restaurant} is a {cuisine} restaurant in {city} rated {rating}.", "{cuisine} food in {city}"),
    _tool("book_hotel", "Book a hotel room",
          [_p("city", "string", "City name", "cities"), _p("nights", "integer", "Number of nights", "int:1:14"),
           _p("guests", "integer", "Number of guests", "int:1:6")],
          ["Book a hotel in {city} for {nights} nights for {guests} guests.",
           "I need a room in {city}, {nights} nights, {guests} people."],
          [("booking_id", "code:HB-####"), ("total_price", "int:80:4000")],
          "Your hotel in {city} is booked (id {booking_id}); the total is {total_price} dollars.",
          "a hotel in {city}"),
    _tool("get_news", "Get the top headline for a topic",
          [_p("topic", "string", "News topic", "topics")],
          ["What's the latest {topic} news?", "Any news about {topic}?", "Give me a {topic} headline."],
          [("headline", "tasks")],
          "The top {topic} headline: {headline}.", "{topic} news"),
    _tool("get_directions", "Get travel distance and time between two places",
          [_p("origin", "string", "Start", "cities"), _p("destination", "string", "End", "cities"),
           _p("mode", "string", "How to travel", "", ("driving", "walking", "transit"))],
          ["How long is the trip from {origin} to {destination}?",
           "Directions from {origin} to {destination} by {mode}.",
           "How far is {destination} from {origin} by {mode}?"],
          [("distance_km", "int:1:3000"), ("duration_minutes", "int:5:2000")],
          "From {origin} to {destination} is {distance_km} km, about {duration_minutes} minutes.",
          "directions to {destination}", required=["origin", "destination"]),
    _tool("add_todo", "Add an item to the to-do list",
          [_p("task", "string", "What to do", "tasks"), _p("due_date", "string", "Due date, YYYY-MM-DD", "date")],
          ["Add '{task}' to my to-do list for {due_date}.", "Remind me to {task} by {due_date}."],
          [("todo_id", "int:1:999")],
          "Added '{task}' due {due_date} as item {todo_id}.", "a to-do item"),
    _tool("check_order_status", "Check the status of an order",
          [_p("order_id", "string", "Order number", "code:ORD-#####")],
          ["Where is my order {order_id}?", "What's the status of order {order_id}?"],
          [("status", "statuses"), ("eta", "date")],
          "Order {order_id} is {status}, expected {eta}.", "the status of order {order_id}"),
    _tool("get_movie_showtimes", "List showtimes for a movie in a city",
          [_p("movie", "string", "Movie title", "songs"), _p("city", "string", "City name", "cities")],
          ["When is {movie} playing in {city}?", "Showtimes for {movie} in {city}?"],
          [("showtime", "time"), ("cinema", "word")],
          "{movie} plays at {showtime} at the {cinema} cinema in {city}.", "showtimes for {movie}"),
    _tool("calculate_tip", "Calculate the tip for a bill",
          [_p("bill_amount", "number", "Bill total", "num:5:400"), _p("percent", "integer", "Tip percent", "int:5:30")],
          ["What's a {percent} percent tip on {bill_amount}?", "Tip for a bill of {bill_amount} at {percent}%?"],
          [("tip", "num:1:100")],
          "A {percent}% tip on {bill_amount} is {tip}.", "a tip"),
    _tool("get_population", "Get the population of a country",
          [_p("country", "string", "Country name", "countries")],
          ["What is the population of {country}?", "How many people live in {country}?"],
          [("population", "int:100000:999999999")],
          "{country} has a population of {population}.", "the population of {country}"),
    _tool("convert_units", "Convert a measurement between units",
          [_p("value", "number", "Value to convert", "num:1:1000"),
           _p("from_unit", "string", "Unit to convert from", "units"),
           _p("to_unit", "string", "Unit to convert to", "units")],
          ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"],
          [("result", "num:1:5000")],
          "{value} {from_unit} is {result} {to_unit}.", "a unit conversion"),
    _tool("track_package", "Track a parcel by its tracking number",
          [_p("tracking_number", "string", "Tracking number", "code:AA#########")],
          ["Track package {tracking_number}.", "Where is my parcel {tracking_number}?"],
          [("location", "cities"), ("status", "statuses")],
          "Package {tracking_number} is {status}, last seen in {location}.", "to track {tracking_number}"),
    _tool("get_air_quality", "Get the air quality index for a city",
          [_p("city", "string", "City name", "cities")],
          ["What's the air quality in {city}?", "Is the air clean in {city} today?", "Air quality index for {city}?"],
          [("aqi", "int:5:300"), ("level", "levels")],
          "The air quality in {city} is {level}, index {aqi}.", "the air quality in {city}"),
    _tool("search_recipes", "Find a recipe with an ingredient",
          [_p("ingredient", "string", "Main ingredient", "ingredients"),
           _p("max_minutes", "integer", "Maximum cooking time", "int:10:120")],
          ["Find a recipe with {ingredient}.", "Something to cook with {ingredient} in under {max_minutes} minutes?"],
          [("recipe", "word"), ("minutes", "int:5:120")],
          "Try {recipe}: it uses {ingredient} and takes {minutes} minutes.", "a recipe with {ingredient}",
          required=["ingredient"]),
    _tool("set_reminder", "Set a reminder at a time",
          [_p("text", "string", "What to be reminded of", "tasks"), _p("time", "string", "When, HH:MM", "time")],
          ["Remind me to {text} at {time}.", "Set a reminder at {time}: {text}."],
          [("reminder_id", "code:R-####")],
          "I will remind you to {text} at {time} (id {reminder_id}).", "a reminder at {time}"),
    _tool("get_sports_score", "Get the latest score of a team",
          [_p("team", "string", "Team name", "teams")],
          ["How did the {team} do?", "What was the {team} score?", "Latest {team} result?"],
          [("score", "code:#-#"), ("opponent", "teams")],
          "The {team} played the {opponent} and the score was {score}.", "the {team} score"),
    _tool("get_exchange_rate", "Get the exchange rate between two currencies",
          [_p("base", "string", "Base currency code", "currencies"),
           _p("quote", "string", "Quote currency code", "currencies")],
          ["What is the {base} to {quote} exchange rate?", "Exchange rate {base}/{quote}?"],
          [("rate", "num:0:200")],
          "One {base} is {rate} {quote}.", "the {base} to {quote} rate"),
    _tool("reserve_table", "Reserve a table at a restaurant",
          [_p("restaurant", "string", "Restaurant name", "word"),
           _p("party_size", "integer", "Number of people", "int:1:12"),
           _p("time", "string", "Time, HH:MM", "time")],
          ["Reserve a table at {restaurant} for {party_size} at {time}.",
           "Book {restaurant} for {party_size} people at {time}."],
          [("confirmation", "code:AAA###")],
          "Your table at {restaurant} for {party_size} at {time} is confirmed: {confirmation}.",
          "a table at {restaurant}"),
    _tool("play_music", "Play a song",
          [_p("song", "string", "Song title", "songs")],
          ["Play {song}.", "Can you put on {song}?", "I want to hear {song}."],
          [("track_id", "code:TR-####")],
          "Now playing {song} (track {track_id}).", "to hear {song}"),
)
# fmt: on

# Verbs a realistic tool's name may start with instead of its own: each tool is served under about ten names
# (`fetch_weather`, `getWeather`, `lookupWeather`, ...), so the held-out split can hold out names without holding
# out what a request for the tool looks like, and the model must read the name from the schema.
_VERB_SYNONYMS = {
    "get": ("fetch", "lookup", "query", "retrieve", "check", "read"),
    "search": ("find", "lookup", "query", "browse", "list"),
    "create": ("add", "new", "make", "insert", "schedule"),
    "add": ("create", "new", "make", "insert", "save"),
    "send": ("post", "deliver", "compose", "dispatch"),
    "set": ("start", "create", "schedule", "new"),
    "convert": ("transform", "calc", "compute"),
    "book": ("reserve", "make", "request", "hold"),
    "reserve": ("book", "make", "request", "hold"),
    "check": ("get", "lookup", "query", "fetch"),
    "track": ("trace", "locate", "follow", "find"),
    "play": ("start", "queue", "stream", "open"),
    "translate": ("localize", "interpret"),
    "calculate": ("compute", "calc", "estimate"),
}


def name_variants(name: str) -> tuple[str, ...]:
    """A realistic tool's names: its first word (a verb) or a synonym, then the rest, in snake_case or camelCase;
    `name` itself comes first."""
    verb, *rest = name.split("_")
    variants = dict.fromkeys([name])
    for v in (verb, *_VERB_SYNONYMS[verb]):
        variants[f"{v}_{'_'.join(rest)}"] = None
        variants[v + "".join(w.capitalize() for w in rest)] = None
    return tuple(variants)


# Tools whose names start with `get` or `check`, verbs that share their synonyms (fetch, lookup, query, ...): in a
# list of these, a name's first token does not tell the tools apart, the rest of the name does. The evaluation
# found the model weakest there until the shipped checkpoint trained on such lists (docs/nano-training.md).
CONFUSABLE_TOOLS = tuple(t for t in REALISTIC_TOOLS if t.name.startswith(("get_", "check_")))


def realistic_tool(rng: random.Random, pool: tuple[ToolSpec, ...] = REALISTIC_TOOLS) -> ToolSpec:
    """A realistic tool of `pool` under one of its names."""
    spec = rng.choice(pool)
    return replace(spec, name=rng.choice(name_variants(spec.name)))


def confusable_tool(rng: random.Random) -> ToolSpec:
    return realistic_tool(rng, CONFUSABLE_TOOLS)


_TYPES = ("string", "string", "string", "integer", "integer", "number", "boolean")
_STRING_SOURCES = ("word", "cities", "people", "code:AA-###", "code:###A", "date", "time")
_RANDOM_REQUESTS = (
    "Please {verb} the {thing} with {args}.",
    "Call {name} with {args}.",
    "Use {name}: {args}.",
    "Can you {verb} the {thing}? {args}.",
    "I need to {verb} the {thing} for {args}.",
    "Run {name} for {args}.",
)
_RANDOM_ANSWERS = ("The {thing} is {r0}.", "Done: {rk0} is {r0}.", "{name} returned {r0}.",
                   "The result: {rk0} is {r0}.")
_ARG_STYLES = ("{key} {slot}", "{key} = {slot}", "{key} is {slot}", "{key}: {slot}")


def _random_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        base = rng.choice(words.NOUNS) if rng.random() < 0.5 else words.nonsense(rng, rng.choice((1, 2)))
        key = f"{base}_{rng.choice(words.KEY_SUFFIXES)}" if rng.random() < 0.6 else base
        if key not in taken:
            taken.add(key)
            return key


def random_tool(rng: random.Random) -> ToolSpec:
    """A made-up tool: its name from a verb and one or two nouns (some nonsense), 1-3 parameters of mixed types."""
    verb = rng.choice(words.VERBS)
    nouns = [words.nonsense(rng) if rng.random() < 0.6 else rng.choice(words.NOUNS)
             for _ in range(rng.choice((1, 2)))]
    if rng.random() < 0.7:
        name = "_".join([verb, *nouns])
    else:
        name = verb + "".join(n.capitalize() for n in nouns)
    thing = " ".join(nouns)
    taken: set[str] = set()
    params = []
    for _ in range(rng.choice((1, 2, 2, 3))):
        key, type_ = _random_key(rng, taken), rng.choice(_TYPES)
        enum = tuple(words.nonsense(rng, 1) for _ in range(3)) if type_ == "string" and rng.random() < 0.2 else ()
        source = {"integer": "int:0:999", "number": "num:0:100", "boolean": "bool"}.get(type_) \
            or rng.choice(_STRING_SOURCES)
        params.append(_p(key, type_, f"The {key.replace('_', ' ')}", source, enum))
    style = rng.choice(_ARG_STYLES)
    args = ", ".join(style.format(key=p.key, slot="{" + p.key + "}") for p in params)
    requests = tuple(t.format(verb=verb, thing=thing, name=name, args=args) for t in _RANDOM_REQUESTS)
    result_keys: set[str] = set()
    result = [(_random_key(rng, result_keys), rng.choice(("word", "int:0:9999", "code:AA##", "cities")))]
    answer = rng.choice(_RANDOM_ANSWERS).format(thing=thing, name=name, rk0=result[0][0], r0="{" + result[0][0] + "}")
    description = f"{verb.capitalize()} the {thing}"
    return _tool(name, description, params, requests, result, answer, f"to {verb} the {thing}")
