"""A stop string ends a choice even when the engine has already run further steps: tokens from steps that were
in flight before the abort reached the engine are neither sent nor counted in usage."""

import asyncio

from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.generation import Generation
from glmserve.serving.metrics import Metrics, RequestTimer
from glmserve.serving.output_processor import OutputProcessor
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import EngineOutput, SamplingParams


class LateStream:
    """A request stream that keeps yielding after abort, as the engine thread may for steps already queued."""

    def __init__(self, outputs):
        self._outputs = iter(outputs)
        self.aborted = []

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    def abort(self, request_ids=None):
        self.aborted.append(request_ids)


PARAMS = SamplingParams(stop=["STOP"], max_tokens=50)


def _generate(tokenizer: Tokenizer, outputs: list[EngineOutput]):
    async def run():
        processor = OutputProcessor(tokenizer, [[1, 2, 3]], PARAMS, "r")
        (choice,) = processor.choices
        stream = LateStream(outputs)
        generation = Generation(processor, stream, RequestTimer(Metrics(client=None)), timeout=None)
        deltas = [d async for d in generation.deltas()]
        token_ids = [t for d in deltas for t in d.token_ids]
        return "".join(d.text for d in deltas), token_ids, generation.usage(), choice, stream

    return asyncio.run(run())


def test_outputs_after_a_stop_string_are_dropped():
    tokenizer = Tokenizer(EMBEDDED_MODEL)
    ids = [tokenizer.encode(word) for word in ("alpha", " beta", " STOP", " gamma", " delta")]
    outputs = [EngineOutput("r-0", ids[0], False), EngineOutput("r-0", ids[1] + ids[2], False),
               EngineOutput("r-0", ids[3], False), EngineOutput("r-0", ids[4], True, "length")]
    text, _, usage, choice, stream = _generate(tokenizer, outputs)
    assert text == "alpha beta "
    assert (choice.finish_reason, choice.stop_reason) == ("stop", "STOP")
    assert usage.completion_tokens == len(ids[0] + ids[1] + ids[2])
    assert stream.aborted == [["r-0"]]


def test_tokens_after_a_stop_string_in_the_same_output_are_dropped():
    """An output may carry several steps' tokens (the stream's reader lagged): the tokens after the one that completes
    the stop string are not counted or sent, so usage does not depend on how the steps were grouped."""
    tokenizer = Tokenizer(EMBEDDED_MODEL)
    words = [tokenizer.encode(word) for word in ("alpha", " beta", " STOP", " gamma")]
    tokens = [t for word in words for t in word]
    kept = len(words[0] + words[1] + words[2])
    one_by_one = [EngineOutput("r-0", [t], False) for t in tokens]
    all_at_once = [EngineOutput("r-0", tokens, False)]
    for outputs in (one_by_one, all_at_once):
        text, token_ids, usage, choice, _ = _generate(tokenizer, outputs)
        assert (text, choice.stop_reason) == ("alpha beta ", "STOP")
        assert token_ids == tokens[:kept] and usage.completion_tokens == kept


def test_offline_llm_drops_the_tokens_of_a_step_after_a_stop_string():
    """LLM.generate (an MTP step emits several tokens) keeps the same tokens the server counts."""
    from types import SimpleNamespace

    from glmserve.llm import LLM, CompletionOutput, RequestOutput

    tokenizer = Tokenizer(EMBEDDED_MODEL)
    words = [tokenizer.encode(word) for word in ("alpha", " beta", " STOP", " gamma")]
    tokens = [t for word in words for t in word]
    aborted = []
    llm = SimpleNamespace(engine=SimpleNamespace(abort=aborted.append))
    completion = CompletionOutput(0)
    processor = OutputProcessor(tokenizer, [[1, 2, 3]], PARAMS, "r")
    LLM._apply(llm, processor, EngineOutput("r-0", tokens, False), RequestOutput("r", None, [1, 2, 3], [completion]))
    assert (completion.text, completion.stop_reason, aborted) == ("alpha beta ", "STOP", [["r-0"]])
    assert completion.token_ids == tokens[: len(words[0] + words[1] + words[2])]
