"""`glmserve chat [MODEL]`: a terminal chat with the engine in-process.

The official GLM-4.5 `trans_infer_cli.py`, made interactive: the conversation is kept and re-rendered with the chat
template every turn (the prefix cache makes the repeated history cheap), replies stream as they are generated, and
the glm45 reasoning parser splits them into reasoning (dimmed on a terminal) and answer, stored back in the history
as `reasoning_content`, the way the template expects an assistant turn.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import TextIO

from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.serving.chat_template import render_chat
from glmserve.serving.output_processor import OutputProcessor, default_sampling
from glmserve.serving.parsers import Glm45StreamParser
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import ParamError, SamplingParams

HELP = "/think, /nothink: thinking on or off; /clear: forget the conversation; /exit or Ctrl-D: quit"
DIM, RESET = "\033[2m", "\033[0m"
PROMPT = ">>> "


class ChatSession:
    """One conversation. `reply(text)` streams the answer to a user message as (field, text) pieces, field being
    "reasoning_content" or "content", and adds the exchange to the history once the reply is complete."""

    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, template: str, params: SamplingParams,
                 system: str | None = None):
        self.engine, self.tokenizer, self.template, self.params = engine, tokenizer, template, params
        self.system = system
        self.thinking = True
        self._ids = itertools.count()
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[tuple[str, str]]:
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = render_chat(self.template, messages, enable_thinking=self.thinking,
                             **self.tokenizer.special_tokens_map)
        # As the server decides: with thinking off the prompt already ends with the empty think block.
        parser = Glm45StreamParser(thinking=not prompt.endswith("</think>"), parse_tools=False)
        parts = {"reasoning_content": "", "content": ""}

        def pieces():
            for delta in self._generate(self.tokenizer.encode(prompt)):
                yield from parser.feed(delta)
            yield from parser.finish()

        for piece in pieces():
            for field, value in piece.items():
                parts[field] += value
                yield field, value
        self.messages = [*messages, {"role": "assistant", **{k: v for k, v in parts.items() if v or k == "content"}}]

    def _generate(self, prompt_ids: list[int]) -> Iterator[str]:
        """The new text of each engine step (the output path the server uses); closing the generator early aborts
        the request."""
        outputs = OutputProcessor(self.tokenizer, [prompt_ids], self.params, f"chat-{next(self._ids)}")
        (choice,) = outputs.choices
        self.engine.add_request(choice.request_id, prompt_ids, outputs.sample_params[0])
        try:
            while not outputs.finished and self.engine.has_unfinished_requests():
                for step in self.engine.step():
                    delta = outputs.process(step)
                    if delta is not None:
                        yield delta.text
        finally:
            self.engine.abort([choice.request_id])  # unknown (finished) ids are ignored


def show(pieces: Iterator[tuple[str, str]], out: TextIO, color: bool) -> None:
    """Write a streamed reply: reasoning (dimmed when `color`), a blank line, then the answer."""
    field = None
    for key, value in pieces:
        if key != field:
            if field == "reasoning_content":
                out.write((RESET if color else "") + "\n\n")
            if key == "reasoning_content" and color:
                out.write(DIM)
            field = key
        out.write(value)
        out.flush()
    out.write((RESET if color and field == "reasoning_content" else "") + "\n")
    out.flush()


def run(config: EngineConfig, tokenizer: Tokenizer, template: str, max_tokens: int | None,
        temperature: float | None, system: str | None, scripted_output_file: str | None = None) -> int:
    engine = LLMEngine(config, progress=False)
    if scripted_output_file:  # test-only, as in `glmserve serve`
        from glmserve.testing.scripted import ScriptedRunner

        engine.runner = ScriptedRunner.from_file(engine.runner, scripted_output_file, tokenizer)
    # The checkpoint's generation_config.json sampling defaults, as the server applies them.
    params = SamplingParams(**default_sampling(engine.generation_defaults, temperature), max_tokens=max_tokens)
    session = ChatSession(engine, tokenizer, template, params, system)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(HELP, file=sys.stderr)
    color = sys.stdout.isatty()
    while True:
        try:
            line = input(PROMPT).strip()
            if line == "/exit":
                return 0
            if line in ("/think", "/nothink"):
                session.thinking = line == "/think"
                print(f"thinking {'on' if session.thinking else 'off'}", file=sys.stderr)
            elif line == "/clear":
                session.clear()
                print("conversation cleared", file=sys.stderr)
            elif line:
                show(session.reply(line), sys.stdout, color)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # stops the reply (left out of the history) or drops the line being typed
            print(RESET if color else "")
        except ParamError as e:  # the conversation outgrew the context
            print(f"error: {e} (/clear starts over)", file=sys.stderr)
