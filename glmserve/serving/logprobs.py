"""Logprobs in OpenAI's two shapes: chat (`token`, `logprob`, `bytes`, `top_logprobs`) and legacy completions.

A token's `bytes` are its exact bytes, also for a token that holds part of a UTF-8 character (byte-level BPE maps
each byte to one printable character; the map is inverted here); its `token` string is those bytes decoded, with
U+FFFD for an incomplete character, as OpenAI shows it. Both are computed once per token id.
"""

from __future__ import annotations

from glmserve.serving.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import TokenLogprobs


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others are shifted above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


_BYTE_DECODER = _byte_level_decoder()


class LogprobsFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token."""
        cached = self._cache.get(token_id)
        if cached is None:
            piece = self._tokenizer.id_to_token(token_id) or ""
            if token_id in self._tokenizer.added_token_ids or any(ch not in _BYTE_DECODER for ch in piece):
                raw = self._tokenizer.decode([token_id], skip_special_tokens=False).encode()
            else:
                raw = bytes(_BYTE_DECODER[ch] for ch in piece)
            cached = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return cached

    def chat(self, entries: list[TokenLogprobs]) -> list[TokenLogprob]:
        out = []
        for e in entries:
            top = []
            for token_id, logprob in e.top:
                text, raw = self.token(token_id)
                top.append(TopLogprob(token=text, logprob=logprob, bytes=raw))
            text, raw = self.token(e.token_id)
            out.append(TokenLogprob(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
        return out

    def completion(self, entries: list[TokenLogprobs], text_offset: int) -> CompletionLogprobs:
        """Legacy shape; `text_offset` is where the first token's text starts in the choice's text."""
        result = CompletionLogprobs()
        for e in entries:
            text, _ = self.token(e.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(e.logprob)
            result.top_logprobs.append({self.token(i)[0]: lp for i, lp in e.top})
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result
