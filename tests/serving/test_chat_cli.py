"""`glmserve chat`: a terminal conversation that keeps its history, streams, and shows reasoning apart."""

import io
import json
import subprocess
import sys

import pytest

from glmserve.chat_cli import DIM, RESET, ChatSession, show
from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.serving.templates import glm45_chat_template
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.scripted import ScriptedRunner
from glmserve.types import SamplingParams

# The second marker holds the first reply and the thinking-off rendering, so it also checks the history.
SCRIPT = {"def<|user|>\nhi/nothink<|assistant|>\n<think></think>": "ghi<|user|>",
          "hello<|assistant|>": "\n<think>abc</think>\ndef<|user|>"}


@pytest.fixture
def session(checkpoint):
    engine = LLMEngine(EngineConfig(model=str(checkpoint), num_kv_blocks=32), progress=False)
    tokenizer = Tokenizer(checkpoint)
    engine.runner = ScriptedRunner(engine.runner, SCRIPT, tokenizer)
    return ChatSession(engine, tokenizer, glm45_chat_template(), SamplingParams(temperature=0, max_tokens=64))


@pytest.mark.parametrize("color", [True, False])
def test_reasoning_is_shown_dimmed_and_apart_from_the_answer(session, color):
    out = io.StringIO()
    show(session.reply("hello"), out, color)
    assert out.getvalue() == (f"{DIM}abc{RESET}\n\ndef\n" if color else "abc\n\ndef\n")
    assert session.messages == [{"role": "user", "content": "hello"},
                                {"role": "assistant", "reasoning_content": "abc", "content": "def"}]
    session.thinking = False
    out = io.StringIO()
    show(session.reply("hi"), out, color)
    assert out.getvalue() == "ghi\n" and session.messages[-1] == {"role": "assistant", "content": "ghi"}
    session.clear()
    assert session.messages == []


def test_chat_command_converses_over_stdin(checkpoint, tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    turns = ["hello", "/nothink", "hi", "/clear", "/think", "what", "/exit", "never read"]
    result = subprocess.run(
        [sys.executable, "-m", "glmserve", "chat", str(checkpoint), "--max-tokens", "16", "--num-kv-blocks", "32",
         "--scripted-output-file", str(script)],
        input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prompts = result.stdout.split(">>> ")
    assert len(prompts) == 8  # one per line read, up to /exit
    assert prompts[1] == "abc\n\ndef\n" and prompts[3] == "ghi\n"  # "what" gets the random model's own reply
    assert "thinking off" in result.stderr and "conversation cleared" in result.stderr and DIM not in result.stdout
