"""A stop string ends a choice even when the engine has already run further steps: tokens from steps that were
in flight before the abort reached the engine are neither sent nor counted in usage."""

import asyncio

from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.generation import Choice, Generation
from glmserve.serving.metrics import Metrics, RequestTimer
from glmserve.serving.text_output import TextOutput
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import RequestOutput, SamplingParams


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


def test_outputs_after_a_stop_string_are_dropped():
    tokenizer = Tokenizer(EMBEDDED_MODEL)
    params = SamplingParams(stop=["STOP"], max_tokens=50)
    ids = [tokenizer.encode(word) for word in ("alpha", " beta", " STOP", " gamma", " delta")]
    outputs = [RequestOutput("r", ids[0], False), RequestOutput("r", ids[1] + ids[2], False),
               RequestOutput("r", ids[3], False), RequestOutput("r", ids[4], True, "length")]

    async def run():
        choice = Choice(0, "r", [1, 2, 3], TextOutput(tokenizer, params))
        stream = LateStream(outputs)
        generation = Generation(params, [choice], stream, RequestTimer(Metrics(client=None)), timeout=None)
        text = "".join([d.text async for d in generation.deltas()])
        return text, generation.usage(), choice, stream

    text, usage, choice, stream = asyncio.run(run())
    assert text == "alpha beta "
    assert (choice.finish_reason, choice.stop_reason) == ("stop", "STOP")
    assert usage.completion_tokens == len(ids[0] + ids[1] + ids[2])
    assert stream.aborted == [["r"]]
