"""Tool calls held to their schemas in GLM-4.5's own syntax, as an xgrammar structural tag.

GLM-4.5 writes a call as `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n...</tool_call>`,
several calls joined by `\\n` (its chat template). xgrammar's `glm_xml` JSON-schema style is exactly that argument
syntax (whitespace between the tags allowed): keys are the schema's properties, in its order, required ones
present, none repeated; a string value is raw text, any other value JSON of the property's type. Values may not
spell the call markup, so the tool-call parser always finds the call the grammar made.

What is held, by `tool_choice` (chat.py forces the start of the call into the prompt for the first two):

* a named function: the prompt ends with `<tool_call>NAME\\n`; the grammar is that function's arguments and
  `</tool_call>`, then only a stop token. Raw, unclosed markup can no longer end a turn.
* "required": the prompt ends with `<tool_call>`; the grammar is one call to a listed function (its name, its
  arguments), then, with `parallel_tool_calls`, more calls, each after `\\n<tool_call>`.
* "auto": free text (or no grammar at all) until the model opens `<tool_call>`; then the call must name a listed
  function, and a strict one's arguments follow its schema. Held only when some tool is strict (OpenAI's
  `"strict": true`) or the server's `--tool-strict-level` (vLLM's flag) says so: `function` holds the names of
  every request's calls, `parameter` also treats every tool as strict.

The schemas of the functions held are checked like any JSON schema (keywords xgrammar would not enforce: 400).
"""

from __future__ import annotations

from glmserve.serving.parsers.glm45 import TOOL_CLOSE, TOOL_OPEN
from glmserve.serving.structured_output import GLM_TOOL_MARKUP, MAX_WHITESPACE, GrammarSpec, check_json_schema
from glmserve.types import ParamError

TOOL_STRICT_LEVELS = ("auto", "function", "parameter")
_CALL_SEPARATOR = "\n" + TOOL_OPEN  # between two calls, as the chat template writes them
# No value may spell the markup that delimits calls and arguments ("</arg_value>" is excluded by the style).
_MARKUP = [m for m in GLM_TOOL_MARKUP if m != "</arg_value>"]


def _arguments(function: dict, strict: bool) -> dict:
    if not strict:  # the name is held, the arguments are free text up to the end of the call
        return {"type": "any_text", "excludes": [TOOL_OPEN]}
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    check_json_schema(schema, "tools")
    return {"type": "json_schema", "json_schema": schema, "style": "glm_xml", "excludes": _MARKUP,
            "max_whitespace_cnt": MAX_WHITESPACE}


def _tag(begin: str, function: dict, strict: bool) -> dict:
    return {"type": "tag", "begin": begin, "content": _arguments(function, strict), "end": TOOL_CLOSE}


def tool_call_grammar(tools: list[dict], named: str | None, required: bool, parallel: bool,
                      strict_level: str = "auto") -> GrammarSpec | None:
    """The structural tag that holds a request's calls, or None when nothing is held.

    tools: the request's tools as dicts; named: the function a named tool_choice names; required: tool_choice
    "required"; parallel: parallel_tool_calls."""
    if strict_level not in TOOL_STRICT_LEVELS:
        raise ValueError(f"--tool-strict-level must be one of {', '.join(TOOL_STRICT_LEVELS)}")
    functions = [t["function"] for t in tools]
    if named is not None:
        function = next(f for f in functions if f["name"] == named)
        grammar = {"type": "sequence", "elements": [_arguments(function, True),
                                                    {"type": "const_string", "value": TOOL_CLOSE}]}
    elif required:
        grammar = {"type": "tags_with_separator", "tags": [_tag(f["name"], f, True) for f in functions],
                   "separator": _CALL_SEPARATOR, "at_least_one": True, "stop_after_first": not parallel}
    else:
        strict = [f.get("strict") is True or strict_level == "parameter" for f in functions]
        if strict_level == "auto" and not any(strict):
            return None
        grammar = {"type": "triggered_tags", "triggers": [TOOL_OPEN], "stop_after_first": not parallel,
                   "tags": [_tag(TOOL_OPEN + f["name"], f, s) for f, s in zip(functions, strict)]}
    return GrammarSpec("glm_tool_calls", {"type": "structural_tag", "format": grammar}, "tools")


def check_no_other_grammar(tool_spec: GrammarSpec | None, other: GrammarSpec | None) -> None:
    if tool_spec is not None and other is not None:
        raise ParamError(f"{other.param} cannot be combined with tool calls held to their schemas "
                         "(tool_choice required or named, or strict tools)", other.param)
