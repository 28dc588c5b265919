"""A chat output as an ordered list of blocks, for the APIs whose answers are lists (Anthropic Messages' content
blocks, OpenAI Responses' output items): the reasoning, then text and tool calls in the order the model wrote them.

Blocks are built from the glm45 stream parser's deltas, for a stream step by step and for a whole response by
feeding it the whole output at once, so both have the same blocks however the stream was cut (property-tested in
tests/unit/test_output_blocks.py). A block opens with its first delta and closes when a delta of another kind
arrives or the output ends; a tool call is one whole block (the parser emits it complete).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from glmserve.serving.parsers import Glm45StreamParser

_KINDS = {"reasoning_content": "reasoning", "content": "text", "tool_calls": "tool_call"}


@dataclass(slots=True)
class Block:
    kind: Literal["reasoning", "text", "tool_call"]
    text: str = ""  # reasoning or text: everything so far
    call: dict | None = None  # a tool call, in OpenAI's shape: {"id", "type", "function": {"name", "arguments"}}


@dataclass(slots=True)
class BlockEvent:
    type: Literal["start", "delta", "stop"]
    index: int  # the block's position in the output
    block: Block
    text: str = ""  # a delta's new text (reasoning or text blocks)


class BlockAssembler:
    """Parser deltas in, block events out. `max_tool_calls` keeps only the first calls (parallel tool use off)."""

    def __init__(self, parser: Glm45StreamParser | None, max_tool_calls: int | None = None):
        self._parser = parser
        self._max_tool_calls = max_tool_calls
        self.blocks: list[Block] = []
        self._open: Block | None = None
        self.num_tool_calls = 0

    def feed(self, text: str) -> list[BlockEvent]:
        if not text:
            return []
        return self._add(self._parser.feed(text) if self._parser else [{"content": text}])

    def finish(self) -> list[BlockEvent]:
        events = self._add(self._parser.finish() if self._parser else [])
        events += self._close()
        return events

    def _add(self, deltas: list[dict]) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        for delta in deltas:
            ((key, value),) = delta.items()  # the parser's deltas carry exactly one field
            kind = _KINDS[key]
            if kind == "tool_call":
                for call in value:
                    if self._max_tool_calls is not None and self.num_tool_calls >= self._max_tool_calls:
                        continue
                    self.num_tool_calls += 1
                    events += self._close()
                    block = Block("tool_call", call={k: v for k, v in call.items() if k != "index"})
                    self.blocks.append(block)
                    index = len(self.blocks) - 1
                    events += [BlockEvent("start", index, block), BlockEvent("stop", index, block)]
                continue
            if self._open is None or self._open.kind != kind:
                events += self._close()
                self._open = Block(kind)
                self.blocks.append(self._open)
                events.append(BlockEvent("start", len(self.blocks) - 1, self._open))
            self._open.text += value
            events.append(BlockEvent("delta", len(self.blocks) - 1, self._open, value))
        return events

    def _close(self) -> list[BlockEvent]:
        if self._open is None:
            return []
        block, self._open = self._open, None
        return [BlockEvent("stop", len(self.blocks) - 1, block)]  # the open block is always the last


def whole_blocks(assembler: BlockAssembler, text: str) -> list[Block]:
    """The blocks of a complete output."""
    assembler.feed(text)
    assembler.finish()
    return assembler.blocks


async def stream_block_events(assembler: BlockAssembler, gen) -> AsyncIterator[BlockEvent]:
    """The block events of a one-choice `Generation` as its text arrives (the choice's finish reason is set when
    the last event has been yielded)."""
    async for d in gen.deltas():
        for event in assembler.feed(d.text) + (assembler.finish() if d.finished else []):
            yield event
