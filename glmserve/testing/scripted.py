"""A model runner that says what a test tells it to: for tests that need exact outputs through the whole server.

`ScriptedRunner` wraps the real `ModelRunner`: every step still runs the real model (so the KV cache, the prefix
cache and every request that no script matches behave exactly as without it), then the sampled token of each
request whose prompt matches a script is replaced by the script's next token. After the script, it emits the
tokenizer's EOS. Scripted tokens report a logprob of 0 (the script is certain).

The script is a JSON object `{MARKER: OUTPUT, ...}`: a request whose prompt (decoded with special tokens) contains
MARKER generates OUTPUT, encoded with added tokens matched, so it can spell `<think>`, `<tool_call>` and stop
tokens such as `<|observation|>`. The first matching marker, in file order, wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmserve.engine.model_runner import ModelRunner
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import SchedulerOutput, StepOutput, TokenLogprobs


class ScriptedRunner:
    def __init__(self, runner: ModelRunner, script: dict[str, str], tokenizer: Tokenizer):
        self._runner = runner
        self._tokenizer = tokenizer
        self._scripts = [(marker, tokenizer.encode(output)) for marker, output in script.items()]
        self._eos = tokenizer.eos_token_id
        self._by_request: dict[str, list[int] | None] = {}

    @classmethod
    def from_file(cls, runner: ModelRunner, path: str | Path, tokenizer: Tokenizer) -> ScriptedRunner:
        return cls(runner, json.loads(Path(path).read_text(encoding="utf-8")), tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._runner, name)  # everything but execute/release is the real runner's

    def _script_for(self, request) -> list[int] | None:
        if request.request_id not in self._by_request:
            prompt = self._tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)
            self._by_request[request.request_id] = next(
                (tokens for marker, tokens in self._scripts if marker in prompt), None)
        return self._by_request[request.request_id]

    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        out = self._runner.execute(scheduler_output)
        for i, chunk in enumerate(scheduler_output.chunks):
            script = self._script_for(chunk.request)
            if script is None or not out.sampled_token_ids[i]:
                continue
            k = chunk.request.num_output_tokens
            token = script[k] if k < len(script) else self._eos
            out.sampled_token_ids[i] = [token]
            if out.logprobs is not None and out.logprobs[i]:
                out.logprobs[i] = [TokenLogprobs(token, 0.0, 1, [(token, 0.0)])]
        return out

    def release(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)
        self._runner.release(request_id)
