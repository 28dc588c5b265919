"""Tool calls a user writes (argument keys the embedded model never saw), held by the tool grammar under "auto"
(`--tool-strict-level parameter`): every call the model opens closes and validates. These are the held-out
requests on which it did not, before the grammar allowed the markup and the keys only in their own tokens: the
model, masked away from a key it wanted, spelled the key or the markup in pieces and looped inside the next value
until max_tokens."""

import json

import pytest

from glmserve import LLM, SamplingParams
from glmserve.models import EMBEDDED_MODEL
from glmserve.nano.evaluate import _valid_call, heldout_cases, request_messages
from glmserve.serving.chat_template import normalize_messages, render_chat
from glmserve.serving.parsers.glm45 import THINK_CLOSE, parse_tool_calls
from glmserve.serving.structured_output import StructuredOutputCompiler
from glmserve.serving.tokenizer import Tokenizer
from glmserve.serving.tool_grammar import tool_call_grammar

# (held-out seed, indices among its first 150 tool_call_user requests): the calls that did not close.
ONCE_LOOPING = [(2000, (19, 21, 34, 100, 111, 112, 130, 133)), (1000, (27, 149))]


def _prompt(tokenizer, example) -> str:
    return render_chat(tokenizer.chat_template, normalize_messages(request_messages(example.messages)), example.tools,
                       True, enable_thinking=example.thinking, **tokenizer.special_tokens_map)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_user_tool_calls_close_and_validate_on_the_embedded_model():
    tokenizer = Tokenizer(EMBEDDED_MODEL)
    compiler = StructuredOutputCompiler(tokenizer)
    llm = LLM(num_kv_blocks=512)
    vocab = llm.engine.model_config.vocab_size
    examples = [heldout_cases(seed, 150, ("tool_call_user",))["tool_call_user"][i]
                for seed, indices in ONCE_LOOPING for i in indices]
    params = [SamplingParams(temperature=0.0, max_tokens=160, grammar=compiler.compile_now(
        tool_call_grammar(e.tools, None, False, True, "parameter"), vocab, thinking=e.thinking)) for e in examples]
    outputs = llm.generate([_prompt(tokenizer, e) for e in examples], params)
    for example, output in zip(examples, outputs):
        text = output.outputs[0].text.split(THINK_CLOSE)[-1]
        _, calls = parse_tool_calls(text, example.tools)
        assert output.outputs[0].finish_reason == "stop" and calls, (example.user, text[:300])
        assert all(_valid_call(example.tools, c) for c in calls), (example.user, json.dumps(calls))
