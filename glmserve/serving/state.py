"""What every handler shares: the engine client, the tokenizer and template, the server's settings, its metrics."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from glmserve.engine.engine_client import AsyncEngineClient
from glmserve.serving.drain import InFlight
from glmserve.serving.errors import APIError
from glmserve.serving.limits import ServingLimits
from glmserve.serving.logprobs import LogprobsFormatter
from glmserve.serving.metrics import Metrics
from glmserve.serving.parsers import check_parser_names
from glmserve.serving.prompt_workers import PromptWorkers
from glmserve.serving.structured_output import StructuredOutputCompiler
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import LoRARequest


@dataclass
class ServerState:
    client: AsyncEngineClient
    tokenizer: Tokenizer
    chat_template: str
    model_names: list[str]  # the first is reported when a request names none
    model_path: str
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = None
    limits: ServingLimits = field(default_factory=ServingLimits)
    log_requests: bool = False  # --enable-log-requests: log each request's prompt (vLLM's flag)
    max_log_len: int | None = None  # --max-log-len: characters and token ids of a prompt to log
    tokenize_without_api_key: bool = False  # --tokenize-without-api-key: /tokenize and /detokenize stay open
    in_flight: InFlight = field(default_factory=InFlight)  # ended with an error when a shutdown's grace is over
    prompt_workers: PromptWorkers = field(default_factory=PromptWorkers)  # templates and tokenizer, off the loop
    tool_strict_level: str = "auto"  # --tool-strict-level (serving/tool_grammar.py)
    metrics: Metrics = field(init=False)
    logprobs: LogprobsFormatter = field(init=False)
    structured_output: StructuredOutputCompiler = field(init=False)

    def __post_init__(self) -> None:
        check_parser_names(self.reasoning_parser, self.tool_call_parser)
        self.metrics = Metrics(self.client)
        self.logprobs = LogprobsFormatter(self.tokenizer)
        self.structured_output = StructuredOutputCompiler(self.tokenizer)

    def model_name(self, requested: str | None) -> str:
        """The served model name or LoRA adapter a request names (404 if none)."""
        if requested is None or requested == "":
            return self.model_names[0]
        if requested not in self.model_names and requested not in self.client.loras:
            if self.client.info is None:
                self.client.require_info()  # adapters are known once the engine has loaded: 503 until then
            raise APIError(404, f"The model `{requested}` does not exist.", "model", "model_not_found")
        return requested

    def lora_request(self, model: str, lora_path: str | None = None) -> LoRARequest | None:
        """The adapter a request runs with: SGLang's `lora_path` (an adapter's name) if given, else its model."""
        if lora_path is not None:
            if lora_path not in self.client.loras:
                raise APIError(404, f"The LoRA adapter `{lora_path}` does not exist.", "lora_path",
                               "model_not_found")
            return self.client.loras[lora_path]
        return self.client.loras.get(model)

    def authorized(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        # compare_digest of fixed-length digests: the time taken tells neither how much of a guessed key was right
        # nor the key's length.
        given, expected = (hashlib.sha256(k.encode()).digest() for k in (key.strip(), self.api_key))
        return hmac.compare_digest(given, expected) & (scheme.lower() == "bearer")
