"""Per-request text: incremental detokenization and stop strings, with vLLM's semantics.

The engine stops on token ids; stop *strings* exist only in text, so they are found here, and the caller aborts
the engine request when one is hit. The stop token that ended a request is not detokenized (vLLM does the same),
and a stop string is cut from the text unless `include_stop_str_in_output`.
"""

from __future__ import annotations

from collections.abc import Sequence

from glmserve.serving.tokenizer import IncrementalDetokenizer, Tokenizer
from glmserve.types import SamplingParams


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop or []
        self._include_stop = params.include_stop_str_in_output
        # Streamed text stays this many characters behind, so a stop string split over deltas is never sent.
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""  # all text so far (after any stop-string cut)
        self._sent = 0  # characters of `text` already returned as deltas
        self.stop_string: str | None = None
        self.tokens_used = 0  # of the last update's tokens, those that are output (a stop string ends it early)

    def update(self, new_token_ids: Sequence[int], finished: bool, stopped_by_token: bool) -> str:
        """Add a step's tokens; return the new text that is safe to send. After a stop string, `stop_string`
        is set and the caller must finish the request."""
        if self.stop_string is not None:
            self.tokens_used = 0
            return ""
        self.tokens_used = len(new_token_ids)
        ids = list(new_token_ids)
        if stopped_by_token and not self._include_stop and ids:
            ids = ids[:-1]
        # With stop strings, one token at a time: an update may carry several steps' tokens (the reader lagged), and
        # those after the token that completes a stop string are not output, however the steps were grouped.
        pieces = [[token] for token in ids] if self._stops else [ids]
        for count, piece in enumerate(pieces, 1):
            self._add(self._detokenizer.push(piece))
            if self.stop_string is not None:
                self.tokens_used = count
                break
        else:
            if finished:
                self._add(self._detokenizer.flush())
        done = finished or self.stop_string is not None
        end = len(self.text) if done else max(self._sent, len(self.text) - self._holdback)
        delta, self._sent = self.text[self._sent : end], end
        return delta

    def _add(self, text: str) -> None:
        search_from = max(0, len(self.text) - self._holdback)
        self.text += text
        self._find_stop_string(search_from)

    def _find_stop_string(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is not None:
            index, stop = best
            self.text = self.text[: index + len(stop) if self._include_stop else index]
            self.stop_string = stop
