"""The checkpoint's tokenizer (`tokenizer.json` + `tokenizer_config.json`) and an incremental detokenizer.

Two ways to encode, because rendered chat templates and raw user text need opposite treatment of added tokens:

* `encode(text)` matches added tokens (`<|user|>`, `[gMASK]`, `<think>`, ...) and maps them to their ids. Use it
  for a rendered chat template, which writes the control tokens as text. (transformers' `apply_chat_template` does
  the same, so user text inside a rendered template can still spell a control token, as it can there.)
* `encode_plain(text)` never produces an added token's id: `<|user|>` typed by a user is encoded as the ordinary
  text `<`, `|`, `user`, ... Use it for text that must not inject control tokens (e.g. a completion prompt given
  as text with control tokens disallowed). The `tokenizers` switch `encode_special_tokens` is not enough here: it
  only splits *special* added tokens and would still turn `<think>` or `<tool_call>` (non-special in GLM-4.5)
  into their ids. So this uses a copy of the tokenizer without its added tokens, which is what transformers'
  `_encode_without_added_tokens` computes, without its Python loop over pre-tokenized words.

A rendered chat prompt mixes both: the template's control tokens, and text a client sent. `mark_literal` marks the
added-token strings in client text before rendering (as private-use markers, which templates pass through
untouched), and `encode_marked` encodes the rendered prompt with those spans as plain text: `<|user|>` or `<think>`
typed in a message is never a control token. Only a /v1/completions prompt, the client's whole raw prompt (ids or
text, as in vLLM), reaches control tokens directly. GLM's `/nothink` switch is left alone in the client's own text
(users are meant to type it), and marked in third parties' text (tool results, tool descriptions) and in the model's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers

# Added tokens that users type on purpose: GLM-4.5's soft switch to turn thinking off for one turn.
_SWITCHES = frozenset({"/nothink"})
_MARK, _MARK_END = "\ue000", "\ue001"  # private-use characters: no tokenizer or template gives them a meaning
_MARKED = re.compile(f"{_MARK}(\\d+){_MARK_END}")

# tokenizer_config.json keys that transformers exposes to chat templates as `special_tokens_map`.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value) -> str | None:
    # tokenizer_config.json stores a token either as its string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _select_chat_template(value) -> str | None:
    # A list of {"name", "template"} is transformers' multi-template form; serving renders the "default" one.
    if isinstance(value, list):
        templates = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return templates.get("default")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint directory's tokenizer. Ids beyond `vocab_size` (embedding padding rows) decode to nothing."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        with open(directory / "tokenizer.json", encoding="utf-8") as f:
            tokenizer_json = f.read()
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        without_added = json.loads(tokenizer_json)
        without_added["added_tokens"] = []
        self._plain = tokenizers.Tokenizer.from_str(json.dumps(without_added))

        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        template_path = directory / "chat_template.jinja"  # newer checkpoints store it beside the config
        if template_path.exists():
            self.chat_template: str | None = template_path.read_text(encoding="utf-8")
        else:
            self.chat_template = _select_chat_template(config.get("chat_template"))

        self.special_tokens_map: dict[str, str] = {
            key: content for key in _SPECIAL_TOKEN_KEYS if (content := _token_content(config.get(key))) is not None
        }
        added = self._tokenizer.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, token in added.items() if token.special)
        self.added_token_ids: frozenset[int] = frozenset(added)
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id: int | None = self.token_to_id(eos) if eos is not None else None
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        # Longest first, so that no token's string is matched as part of a longer one; the marker character itself
        # is marked too, so client text can never spell a marker.
        literals = sorted({t.content for t in added.values()}, key=len, reverse=True) + [_MARK]
        self._literal_index = {text: i for i, text in enumerate(literals)}
        self._literals = literals
        controls = [t for t in literals if t not in _SWITCHES and t != _MARK]
        switches = [t for t in literals if t in _SWITCHES]
        self._literal_patterns = {  # (control tokens marked, switches marked) -> pattern; longest strings first
            (c, w): re.compile("|".join(map(re.escape, (controls if c else []) + (switches if w else []) + [_MARK])))
            for c in (True, False) for w in (True, False)}
        # The most characters one token stands for (+1: a decoder may drop a token's leading space when it is
        # decoded alone; at least a marked span's length, which encodes to one token or more). A text of C
        # characters, marked or not, is at least C / max_token_chars tokens.
        singles = self._tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        self.max_token_chars: int = max(*map(len, singles), len(str(len(literals))) + 2) + 1

    def mark_literal(self, text: str, control_tokens: bool = True, switches: bool = False) -> str:
        """`text` with the marker character, each control token's string (unless `control_tokens=False`) and each
        user switch like `/nothink` (if `switches`) marked for `encode_marked` to encode as plain text."""
        pattern = self._literal_patterns[control_tokens, switches]
        return pattern.sub(lambda m: f"{_MARK}{self._literal_index[m.group()]}{_MARK_END}", text)

    def encode_marked(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`encode`, except that spans marked by `mark_literal` are encoded as plain text."""
        if _MARK not in text:
            return self.encode(text, add_special_tokens)
        texts, literals, start = [], [], 0
        for m in _MARKED.finditer(text):
            texts.append(text[start:m.start()])
            literals.append(self._literals[int(m.group(1))])
            start = m.end()
        texts.append(text[start:])
        encoded_texts = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        encoded_literals = self._plain.encode_batch(literals, add_special_tokens=False)
        parts = [part for pair in zip(encoded_texts, encoded_literals) for part in pair] + [encoded_texts[-1]]
        merged = tokenizers.Encoding.merge(parts, growing_offsets=True)
        return (self._tokenizer.post_process(merged) if add_special_tokens else merged).ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode with added tokens matched (for rendered chat templates). `add_special_tokens` runs the
        post-processor; GLM templates already write `[gMASK]<sop>`, hence the default False."""
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized in a worker
        # thread leaves the event loop and the engine thread running.
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode as ordinary text: the strings of added tokens are split like any other text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > 4096:  # decode_batch releases the GIL (see encode); not worth it for a stream's few tokens
            return self._tokenizer.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def vocab(self) -> dict[str, int]:
        """Every token's string as tokenizer.json stores it (byte-level encoded), added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json (grammar compilers read its pre-tokenizer and decoder)."""
        return self._tokenizer.to_str()


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas (the prefix/read offsets of HF TGI and vLLM).

    `decode(ids[prefix_offset:])` minus `decode(ids[prefix_offset:read_offset])` is the new text; it is held back
    while it ends in U+FFFD, i.e. while a multi-byte UTF-8 character is split over tokens still to come. Byte-level
    BPE needs no left context from the prompt (no SentencePiece leading-space rule), so the output is decoded on
    its own: the pushes plus `flush()` concatenate to exactly `decode(all output ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # end of the text already returned

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append output ids; return the text they complete (possibly "")."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the text still held back (a trailing incomplete character decodes as U+FFFD); call at the end."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]
