"""Prompts are rendered and tokenized off the event loop, and refused before tokenizing when they cannot fit.

A 15 MB prompt used to hold the event loop for 20-30 s (the chat template, then the tokenizer), stalling every
stream and /health. Now:

* `PromptWorkers` runs template rendering and tokenization in a small pool of threads. The tokenizer releases the
  GIL while it works (`Tokenizer.encode`), so the event loop and the engine thread keep running.
* `check_fits` refuses a text whose length in characters alone shows that it is more tokens than the context
  holds (no token of the tokenizer stands for more than `Tokenizer.max_token_chars` characters), before it is
  tokenized. A prompt that passes is tokenized and checked exactly by the engine, as before.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import ParamError

T = TypeVar("T")


class PromptWorkers:
    def __init__(self, threads: int | None = None):
        threads = threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="glmserve-prompt")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in a worker thread (its exceptions are raised here)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))


def check_fits(text: str, tokenizer: Tokenizer, max_model_len: int, param: str) -> None:
    """Raise ParamError if `text` is certainly more tokens than `max_model_len`, judged by its length alone."""
    if len(text) > max_model_len * tokenizer.max_token_chars:
        raise ParamError(f"the {param} is {len(text)} characters long: more than this model's context of "
                         f"{max_model_len} tokens can hold (a token here is at most {tokenizer.max_token_chars} "
                         f"characters)", param)
