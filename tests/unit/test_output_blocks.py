"""Output blocks (Anthropic content blocks, Responses output items): streamed and whole give the same blocks for
every chunking, and the Anthropic events of any stream are what the `anthropic` SDK's accumulator turns into the
whole message. The outputs and chunkings are the parser property tests' (test_glm45_parsers.py)."""

from __future__ import annotations

import json

from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given
from hypothesis import strategies as st
from test_glm45_parsers import PROPERTY, TYPED, chaos_text, chunk, cuts_for, glm_output, ids

from glmserve.serving.anthropic import _content_block, block_event_sse
from glmserve.serving.output_blocks import BlockAssembler, whole_blocks
from glmserve.serving.parsers import Glm45StreamParser


def assembler(thinking=True, parse_reasoning=True, parse_tools=True, max_tool_calls=None):
    parser = Glm45StreamParser(TYPED, thinking, parse_reasoning, parse_tools, id_factory=ids())
    return BlockAssembler(parser, max_tool_calls)


def streamed(text, cuts, **kw):
    """The blocks and the Anthropic events of `text` fed in the pieces `cuts` makes."""
    a = assembler(**kw)
    events = [e for piece in chunk(text, cuts) for e in a.feed(piece)] + a.finish()
    return a.blocks, events


def test_blocks_in_the_order_written():
    text = "\n<think>hmm</think>\nA <tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call> B"
    blocks = whole_blocks(assembler(), text)
    assert [(b.kind, b.text) for b in blocks] == [("reasoning", "hmm"), ("text", "A"), ("tool_call", ""),
                                                  ("text", "\nB")]
    assert blocks[2].call["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert whole_blocks(assembler(), "") == []
    # parallel tool use off: the first call only
    two = "<tool_call>f\n</tool_call><tool_call>g\n</tool_call>"
    assert [b.call["function"]["name"] for b in whole_blocks(assembler(max_tool_calls=1), two)] == ["f"]


def test_events_open_and_close_each_block_once():
    _, events = streamed("\n<think>ab</think>\ncd", [3, 9, 14, 17])
    assert [(e.type, e.index) for e in events if e.type != "delta"] == [("start", 0), ("stop", 0), ("start", 1),
                                                                        ("stop", 1)]
    assert "".join(e.text for e in events if e.index == 0) == "ab"


def _accumulated(events) -> list[dict]:
    """The SDK's accumulator over message_start and the block events' SSE."""
    snapshot, bufs = None, {}
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "x",
                                                  "content": [], "usage": {"input_tokens": 1, "output_tokens": 0}}}
    snapshot = accumulate_event(event=start, current_snapshot=snapshot, json_bufs=bufs)
    for e in events:
        for sse in block_event_sse(e):
            name, data = sse.split("\n")[:2]
            payload = json.loads(data.removeprefix("data: "))
            assert name == f"event: {payload['type']}"
            snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=bufs)
    return [block.to_dict() for block in snapshot.content]


def _check(text, cuts, **kw):
    whole = whole_blocks(assembler(**kw), text)
    blocks, events = streamed(text, cuts, **kw)
    assert blocks == whole
    assert all(b.text or b.kind == "tool_call" for b in blocks)  # no empty block
    assert _accumulated(events) == [_content_block(b) for b in whole]


@PROPERTY
@given(st.data())
def test_property_stream_and_whole_give_the_same_blocks(data):
    text, thinking, _, _ = data.draw(glm_output())
    _check(text, data.draw(cuts_for(text)), thinking=thinking)


@PROPERTY
@given(st.data())
def test_property_same_blocks_on_any_text(data):
    text = data.draw(chaos_text())
    kw = dict(thinking=data.draw(st.booleans()), parse_reasoning=data.draw(st.booleans()),
              parse_tools=data.draw(st.booleans()), max_tool_calls=data.draw(st.sampled_from([None, 1])))
    _check(text, data.draw(cuts_for(text)), **kw)
