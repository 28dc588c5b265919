"""GLM-4.5 reasoning parser (``<think>…</think>``), non-streaming and streaming.

Rules (GLM45.md §4), identical in both modes:

* ``thinking=True`` (the prompt ends with ``<|assistant|>``): the model itself writes
  ``\\n<think>REASONING</think>\\nCONTENT``.  The output has a reasoning part only when, after
  leading whitespace, it *starts* with ``<think>``; otherwise the whole output is content (a
  ``<think>`` or ``</think>`` anywhere else is plain content text).  Everything after ``<think>``
  up to the first ``</think>`` is reasoning; with no ``</think>`` (output cut off by max_tokens)
  everything after ``<think>`` is reasoning.  A model that "starts inside" the think block without
  writing ``<think>`` is not expected with GLM-4.5's template and is treated as content.
* ``thinking=False`` (the prompt already ends with ``<think></think>``): everything is content.
* Whitespace: the leading whitespace before ``<think>`` and at the start of the content part is
  dropped (the ``\\n`` the format puts there; the template renders ``\\n`` + ``content.strip()``,
  so content never legitimately starts with whitespace).  Reasoning is kept verbatim; nothing
  trailing is stripped.
* Empty parts are ``None``.  The stream parser never emits empty strings, so a part is ``None``
  exactly when its reassembled stream is empty.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def held_tail(buf: str, tag: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


def parse_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """Split a complete GLM-4.5 output into ``(reasoning_content, content)``."""
    stripped = text.lstrip()
    if not thinking or not stripped.startswith(THINK_OPEN):
        return None, stripped or None
    body = stripped[len(THINK_OPEN):]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body or None, None
    content = body[end + len(THINK_CLOSE):].lstrip()
    return body[:end] or None, content or None


_START, _REASONING, _CONTENT_START, _CONTENT = "start", "reasoning", "content_start", "content"


class ReasoningStreamParser:
    """Streaming counterpart of :func:`parse_reasoning`.

    ``feed(delta)`` and ``finish()`` return a delta fragment with the keys
    ``reasoning_content`` and/or ``content`` (absent when there is nothing to emit; never empty
    strings).  Only text that could still turn out to be a tag (a partial ``<think>`` at the start,
    a partial ``</think>``) or whitespace that may be dropped is held back.
    """

    def __init__(self, thinking: bool = True) -> None:
        self._state = _START if thinking else _CONTENT_START
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    def feed(self, delta: str) -> dict:
        self._buf += delta
        return self._step(final=False)

    def finish(self) -> dict:
        return self._step(final=True)

    def _step(self, final: bool) -> dict:
        out: dict = {}
        if self._state == _START:
            s = self._buf.lstrip()
            if s.startswith(THINK_OPEN):
                self._state, self._buf = _REASONING, s[len(THINK_OPEN):]
            elif not s or (THINK_OPEN.startswith(s) and not final):
                self._buf = s  # leading whitespace is dropped anyway; keep waiting
                return out
            else:
                self._state, self._buf = _CONTENT, s
        if self._state == _REASONING:
            end = self._buf.find(THINK_CLOSE)
            if end >= 0:
                reasoning = self._buf[:end]
                self._buf = self._buf[end + len(THINK_CLOSE):]
                self._state = _CONTENT_START
            else:
                cut = len(self._buf) - (0 if final else held_tail(self._buf, THINK_CLOSE))
                reasoning, self._buf = self._buf[:cut], self._buf[cut:]
            if reasoning:
                out["reasoning_content"] = reasoning
        if self._state == _CONTENT_START:
            self._buf = self._buf.lstrip()
            if self._buf:
                self._state = _CONTENT
        if self._state == _CONTENT and self._buf:
            out["content"], self._buf = self._buf, ""
        return out
