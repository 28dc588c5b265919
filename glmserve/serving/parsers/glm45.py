"""GLM-4.5 output parsing: reasoning (``<think>``) and tool calls (``<tool_call>``).

Standard library only.  The rules live in :mod:`.glm45_reasoning` and :mod:`.glm45_tools`; this
module re-exports them and combines them: reasoning is split off first, then tool calls are parsed
from the content part only (GLM45.md §4).

Guarantee (tested over random outputs and random chunkings): feeding any cut of an output to
:class:`Glm45StreamParser` and reassembling the deltas with :func:`merge_deltas` gives exactly what
:func:`parse_output` gives for the whole output — reasoning and content strings equal (``None`` iff
no delta carried that field; no delta carries an empty string), tool calls equal by index (id,
type, name from the call's delta, ``arguments`` equal as strings; ids equal when both sides use
the same deterministic ``id_factory``).
"""

from __future__ import annotations

from .glm45_reasoning import THINK_CLOSE, THINK_OPEN, ReasoningStreamParser, parse_reasoning
from .glm45_tools import (
    TOOL_CLOSE,
    TOOL_OPEN,
    IdFactory,
    ToolCallStreamParser,
    convert_value,
    parse_tool_calls,
    random_call_id,
)

__all__ = [
    "THINK_OPEN", "THINK_CLOSE", "TOOL_OPEN", "TOOL_CLOSE", "IdFactory",
    "parse_reasoning", "parse_tool_calls", "parse_output", "convert_value", "random_call_id",
    "ReasoningStreamParser", "ToolCallStreamParser", "Glm45StreamParser", "merge_deltas",
]

_split_reasoning = parse_reasoning


def parse_output(
    text: str,
    tools: list[dict] | None = None,
    thinking: bool = True,
    *,
    parse_reasoning: bool = True,
    parse_tools: bool = True,
    id_factory: IdFactory | None = None,
) -> tuple[str | None, str | None, list[dict]]:
    """Parse a complete output into ``(reasoning_content, content, tool_calls)``.

    With ``parse_reasoning=False`` the whole output is content (verbatim; ``None`` when empty);
    with ``parse_tools=False`` no tool calls are extracted.
    """
    if parse_reasoning:
        reasoning, content = _split_reasoning(text, thinking)
    else:
        reasoning, content = None, text or None
    calls: list[dict] = []
    if parse_tools and content is not None:
        content, calls = parse_tool_calls(content, tools, id_factory)
    return reasoning, content, calls


class Glm45StreamParser:
    """Streaming counterpart of :func:`parse_output`.

    ``feed(delta)`` and ``finish()`` return a list of OpenAI delta dicts in output order, each with
    exactly one of ``reasoning_content`` / ``content`` / ``tool_calls``; consecutive fragments of
    the same text field within one call are merged.  Call ``finish()`` once, at end of stream.
    """

    def __init__(
        self,
        tools: list[dict] | None = None,
        thinking: bool = True,
        parse_reasoning: bool = True,
        parse_tools: bool = True,
        id_factory: IdFactory | None = None,
    ) -> None:
        self._reasoning = ReasoningStreamParser(thinking) if parse_reasoning else None
        self._tools = ToolCallStreamParser(tools, id_factory) if parse_tools else None

    @property
    def num_tool_calls(self) -> int:
        """Tool calls emitted so far (for ``finish_reason: "tool_calls"``)."""
        return self._tools.num_calls if self._tools is not None else 0

    def feed(self, delta: str) -> list[dict]:
        return self._step(delta, final=False)

    def finish(self) -> list[dict]:
        return self._step("", final=True)

    def _step(self, delta: str, final: bool) -> list[dict]:
        out: list[dict] = []
        if self._reasoning is None:
            content = delta
        else:
            part = self._reasoning.finish() if final else self._reasoning.feed(delta)
            if part.get("reasoning_content"):
                out.append({"reasoning_content": part["reasoning_content"]})
            content = part.get("content", "")
        if self._tools is None:
            if content:
                out.append({"content": content})
            return out
        if content:
            out.extend(self._tools.feed(content))
        if final:
            out.extend(self._tools.finish())
        return _merge_adjacent(out)


def _merge_adjacent(deltas: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for d in deltas:
        prev = merged[-1] if merged else None
        for key in ("reasoning_content", "content"):
            if prev is not None and key in d and key in prev:
                prev[key] += d[key]
                break
        else:
            merged.append(d)
    return merged


def merge_deltas(deltas: list[dict]) -> tuple[str | None, str | None, list[dict]]:
    """Reassemble stream deltas into ``(reasoning_content, content, tool_calls)``.

    Text fields are concatenated (``None`` when nothing arrived); tool-call deltas are merged by
    ``index``: ``id``/``type``/``name`` from the first delta of a call, ``arguments`` concatenated.
    """
    reasoning, content, calls = [], [], {}
    for d in deltas:
        reasoning.append(d.get("reasoning_content") or "")
        content.append(d.get("content") or "")
        for tc in d.get("tool_calls") or ():
            fn = tc.get("function") or {}
            call = calls.get(tc["index"])
            if call is None:
                calls[tc["index"]] = {
                    "id": tc.get("id"),
                    "type": tc.get("type", "function"),
                    "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""},
                }
            else:
                call["function"]["arguments"] += fn.get("arguments") or ""
    return "".join(reasoning) or None, "".join(content) or None, [calls[i] for i in sorted(calls)]
