"""GLM-4.5 tool-call parser, non-streaming and streaming.

The model writes calls as (GLM45.md §3.1)::

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    ...
    </tool_call>

Rules, identical in both modes:

* A call is ``<tool_call>`` up to the first following ``</tool_call>``.  A ``<tool_call>`` never
  closed (output cut off) is *not* a call: it stays in the content as literal text, tag included.
* The name is the text after ``<tool_call>`` up to the first newline or ``<arg_key>``, stripped.
  Every ``<arg_key>K</arg_key>`` followed (after optional whitespace) by ``<arg_value>V</arg_value>``
  is an argument; the key is stripped, a repeated key keeps its last value.
* Values are typed with the request's tool schema (GLM45.md §3.2): a parameter whose schema admits
  ``string`` (``type`` is or contains ``"string"``, an ``anyOf``/``oneOf`` branch admits it, or an
  untyped ``enum``/``const`` of strings) keeps its raw text verbatim, whitespace included.  Any other
  value (unknown tool or parameter included) is stripped and parsed with ``json.loads`` (NaN and
  Infinity refused), then ``ast.literal_eval``; a result that is not JSON-serialisable (set, bytes,
  complex, inf) is refused; the fallback is the raw text verbatim.
* ``arguments`` is ``json.dumps(args, ensure_ascii=False)``; no arguments gives ``"{}"``.
* Content: the output is cut by the closed calls into text pieces (before the first call, between
  calls, after the last).  Each piece loses its leading whitespace, and a piece followed by a call
  also loses its trailing whitespace (whitespace touching a call is format, e.g. the ``\\n`` between
  ``</tool_call>`` and ``<tool_call>``).  The non-empty pieces are joined with ``"\\n"``; the result
  is ``None`` when empty.  The last piece keeps its trailing whitespace.
* Calls are parsed whether or not ``tools`` is given; ``tools`` only types the arguments.  Whether
  to run the parser at all (tools present, tool_choice) is the caller's decision.

The stream parser emits a call as one delta, when its ``</tool_call>`` arrives, with its complete
``arguments`` string; before that it cannot know whether the call will be closed.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import warnings
from typing import Any, Callable

from .glm45_reasoning import held_tail

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
_NAME_END = re.compile(r"\n|<arg_key>")
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

IdFactory = Callable[[], str]


def random_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _find_function(tools: list[dict] | None, name: str) -> dict | None:
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        func = tool.get("function", tool)
        if isinstance(func, dict) and func.get("name") == name:
            return func
    return None


def _admits_string(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    typ = schema.get("type")
    if typ == "string" or (isinstance(typ, list) and "string" in typ):
        return True
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and any(_admits_string(b) for b in branches):
            return True
    if typ is None:
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return all(isinstance(v, str) for v in schema["enum"])
        if "const" in schema:
            return isinstance(schema["const"], str)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _json_value(s: str) -> Any:
    return json.loads(s, parse_constant=_reject_constant)


def _literal_value(s: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes
        return ast.literal_eval(s)


def convert_value(raw: str, is_string: bool) -> Any:
    """Type one argument value (see the module docstring)."""
    if is_string:
        return raw
    s = raw.strip()
    for load in (_json_value, _literal_value):
        try:
            value = load(s)
            json.dumps(value, allow_nan=False, ensure_ascii=False)
            return value
        except Exception:  # noqa: BLE001 - any failure means "try the next way"
            continue
    return raw


def parse_call_body(body: str, tools: list[dict] | None, call_id: str) -> dict:
    """Turn the text between ``<tool_call>`` and ``</tool_call>`` into an OpenAI tool call."""
    m = _NAME_END.search(body)
    name_end = m.start() if m else len(body)
    name = body[:name_end].strip()
    func = _find_function(tools, name) or {}
    params = func.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    props = props if isinstance(props, dict) else {}
    args: dict[str, Any] = {}
    for key, raw in _ARG.findall(body, name_end):
        key = key.strip()
        args[key] = convert_value(raw, _admits_string(props.get(key)))
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


def split_tool_calls(text: str) -> tuple[list[str], list[str]]:
    """Cut ``text`` into text pieces and closed call bodies; ``len(pieces) == len(bodies) + 1``."""
    pieces, bodies, pos = [], [], 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            break
        end = text.find(TOOL_CLOSE, start + len(TOOL_OPEN))
        if end < 0:
            break  # unclosed call: stays in the last text piece
        pieces.append(text[pos:start])
        bodies.append(text[start + len(TOOL_OPEN):end])
        pos = end + len(TOOL_CLOSE)
    pieces.append(text[pos:])
    return pieces, bodies


def join_pieces(pieces: list[str]) -> str | None:
    kept = []
    for i, piece in enumerate(pieces):
        piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            kept.append(piece)
    return "\n".join(kept) or None


def parse_tool_calls(
    text: str, tools: list[dict] | None, id_factory: IdFactory | None = None
) -> tuple[str | None, list[dict]]:
    """Extract GLM-4.5 tool calls from ``text``; returns ``(content, tool_calls)``."""
    new_id = id_factory or random_call_id
    pieces, bodies = split_tool_calls(text)
    calls = [parse_call_body(body, tools, new_id()) for body in bodies]
    return join_pieces(pieces), calls


class ToolCallStreamParser:
    """Streaming counterpart of :func:`parse_tool_calls`.

    ``feed(delta)`` and ``finish()`` return a list of OpenAI delta dicts, in output order:
    ``{"content": str}`` (never empty) and ``{"tool_calls": [{"index", "id", "type", "function":
    {"name", "arguments"}}]}`` (one per call, complete).  Held back: a possible partial
    ``<tool_call>`` with the whitespace run before it, leading whitespace of a text piece, and the
    body of a call not yet closed.
    """

    def __init__(self, tools: list[dict] | None, id_factory: IdFactory | None = None) -> None:
        self._tools = tools
        self._new_id = id_factory or random_call_id
        self._buf = ""
        self._in_call = False
        self._scan = 0  # where to resume looking for </tool_call> in _buf
        self._piece_started = False  # current text piece has emitted text
        self._emitted = False  # any content emitted so far
        self._pending_ws = ""  # whitespace before an open <tool_call>, restored if never closed
        self.num_calls = 0

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        out: list[dict] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._run(out, final=True)
        return out

    def _emit_text(self, out: list[dict], text: str) -> None:
        if not self._piece_started:
            text = text.lstrip()
            if not text:
                return
            if self._emitted:
                text = "\n" + text
            self._piece_started = True
        if not text:
            return
        self._emitted = True
        if out and "content" in out[-1]:
            out[-1]["content"] += text
        else:
            out.append({"content": text})

    def _run(self, out: list[dict], final: bool) -> None:
        while True:
            buf = self._buf
            if not self._in_call:
                start = buf.find(TOOL_OPEN)
                if start < 0:
                    cut = len(buf)
                    if not final:
                        cut -= held_tail(buf, TOOL_OPEN)
                        while cut > 0 and buf[cut - 1].isspace():
                            cut -= 1
                    self._emit_text(out, buf[:cut])
                    self._buf = buf[cut:]
                    return
                text = buf[:start] if self._piece_started else buf[:start].lstrip()
                core = text.rstrip()
                self._emit_text(out, core)
                self._pending_ws = text[len(core):]
                self._buf, self._in_call, self._scan = buf[start + len(TOOL_OPEN):], True, 0
                continue
            end = buf.find(TOOL_CLOSE, self._scan)
            if end < 0:
                if final:  # never closed: literal content text
                    self._emit_text(out, self._pending_ws + TOOL_OPEN + buf)
                    self._buf, self._in_call = "", False
                else:
                    self._scan = max(0, len(buf) - len(TOOL_CLOSE) + 1)
                return
            call = parse_call_body(buf[:end], self._tools, self._new_id())
            out.append({"tool_calls": [{"index": self.num_calls, **call}]})
            self.num_calls += 1
            self._buf, self._in_call = buf[end + len(TOOL_CLOSE):], False
            self._piece_started, self._pending_ws = False, ""
