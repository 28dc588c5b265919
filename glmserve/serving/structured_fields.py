"""The request fields that ask for structured output, as OpenAI, vLLM and SGLang spell them (pydantic only).

`GrammarSpec.from_request` (serving/structured_output.py) turns whichever one a request sets into a grammar; this
module only declares their shapes, so that protocol.py can mix them into the chat and completions bodies.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams`): one of json, regex, choice, grammar,
    json_object; the options that change how a JSON grammar is built. Unknown keys are a 400, not ignored: a
    constraint the server did not apply must not look applied."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False  # there is one backend and no fallback: accepted, nothing to disable
    whitespace_pattern: str | None = None


class StructuredOutputFields(BaseModel):
    """Mixed into the chat and completions request bodies."""

    # OpenAI: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None
    # vLLM
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None
    # SGLang
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
