"""Corpus → token ids with loss masks → padded batches of similar length.

The turns of one conversation share one sequence when each prompt extends the previous turn (a tool call, its
results, the answer), so the prompt is read once and every completion in it is trained. Pieces are tokenized
separately: every piece boundary sits next to an added token (`<|assistant|>`, `</think>`, a stop token), where
the tokenizer splits anyway, so the ids equal those of the whole text (a test checks this). The names of the tools a
turn calls are pieces of their own too (they start after a space or `<tool_call>` and end before a non-letter,
where the pre-tokenizer splits), so their tokens can be marked for the loss to weigh more (`Sequence.emphasis`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from glmserve.nano.corpus import Example
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.tokenizer import GLM45_ADDED_TOKENS

_ADDED = re.compile("|".join(map(re.escape, sorted(GLM45_ADDED_TOKENS, key=len, reverse=True))))


def tokenizer_texts(conversations: Iterable[tuple[Example, ...]]) -> Iterator[str]:
    """The text BPE learns merges from: each conversation's full text without the added tokens' strings."""
    for conversation in conversations:
        last = conversation[-1]
        yield from (piece for piece in _ADDED.split(last.prompt + last.completion) if piece)


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    target: list[bool]  # target[j]: token j is a completion token, i.e. predicted with loss
    emphasis: list[bool]  # emphasis[j]: token j is part of the name of a tool the turn calls


def _name_spans(example: Example) -> list[tuple[int, int]]:
    """Where the completion writes the names of the tools it calls: in the reasoning (with the space before, which
    starts the name's first token) and after `<tool_call>`."""
    names = sorted({call["name"] for call in example.expected.get("calls", ())}, key=len, reverse=True)
    if not names:
        return []
    pattern = r"(?: |(?<=<tool_call>))(?:" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9_])"
    return [m.span() for m in re.finditer(pattern, example.completion)]


def _encode_completion(tokenizer: Tokenizer, example: Example) -> tuple[list[int], list[bool]]:
    """The completion's ids, and which of them belong to called tools' names."""
    ids, emphasis, start = [], [], 0
    end_of_text = (len(example.completion), len(example.completion))  # an empty last name: the text after the names
    for begin, end in [*_name_spans(example), end_of_text]:
        for piece, marked in ((example.completion[start:begin], False), (example.completion[begin:end], True)):
            piece_ids = tokenizer.encode(piece) if piece else []
            ids += piece_ids
            emphasis += [marked] * len(piece_ids)
        start = end
    return ids, emphasis


def encode(tokenizer: Tokenizer, conversation: tuple[Example, ...]) -> list[Sequence]:
    sequences: list[Sequence] = []
    text, ids, target, emphasis = "", [], [], []
    for example in conversation:
        if not (ids and example.prompt.startswith(text)):
            if ids:
                sequences.append(Sequence(ids, target, emphasis))
            text, ids, target, emphasis = "", [], [], []
        prompt_ids = tokenizer.encode(example.prompt[len(text):])
        completion_ids, completion_emphasis = _encode_completion(tokenizer, example)
        ids = ids + prompt_ids + completion_ids
        target = target + [False] * len(prompt_ids) + [True] * len(completion_ids)
        emphasis = emphasis + [False] * len(prompt_ids) + completion_emphasis
        text = example.prompt + example.completion
    sequences.append(Sequence(ids, target, emphasis))
    return sequences


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # [B, S] long, padded with pad_id
    target: torch.Tensor  # [B, S] bool, False on padding
    emphasis: torch.Tensor  # [B, S] bool, True on called tools' names

    @property
    def num_target_tokens(self) -> int:
        return int(self.target.sum())


def collate(sequences: list[Sequence], pad_id: int) -> Batch:
    length = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    target = torch.zeros((len(sequences), length), dtype=torch.bool)
    emphasis = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, s in enumerate(sequences):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        target[row, : len(s.ids)] = torch.tensor(s.target)
        emphasis[row, : len(s.ids)] = torch.tensor(s.emphasis)
    return Batch(ids, target, emphasis)


def batches(tokenizer: Tokenizer, conversations: Iterator[tuple[Example, ...]], tokens_per_batch: int,
            max_len: int, seed: int, pool_size: int = 512) -> Iterator[Batch]:
    """Endless batches of at most `tokens_per_batch` padded tokens; sequences longer than `max_len` are dropped.

    A pool of sequences is sorted by length and cut into batches (little padding), which are then shuffled.
    """
    rng = random.Random(seed)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    while True:
        pool: list[Sequence] = []
        while len(pool) < pool_size:
            pool.extend(s for s in encode(tokenizer, next(conversations)) if len(s.ids) <= max_len)
        pool.sort(key=lambda s: len(s.ids))
        groups, current = [], []
        for s in pool:
            if current and (len(current) + 1) * len(s.ids) > tokens_per_batch:
                groups.append(current)
                current = []
            current.append(s)
        groups.append(current)
        rng.shuffle(groups)
        for group in groups:
            yield collate(group, pad_id)
