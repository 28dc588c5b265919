"""Structured output in serving: which grammar a request asks for, and compiling it (xgrammar) off the engine.

A request names at most one grammar (two are a 400), in any of the spellings of structured_fields.py:

* JSON schema: `response_format` `{"type": "json_schema", "json_schema": {"schema": ...}}`,
  `structured_outputs.json`, `guided_json`, SGLang's `json_schema`
* any JSON: `response_format` `{"type": "json_object"}`, `structured_outputs.json_object`
* regular expression: `structured_outputs.regex`, `guided_regex`, SGLang's `regex`
* one of a list: `structured_outputs.choice`, `guided_choice`
* grammar: `structured_outputs.grammar`, `guided_grammar` (EBNF with `::=`, else Lark, as vLLM tells them
  apart), SGLang's `ebnf`

Tool calls held to their schemas (tool_grammar.py) are a structural tag compiled here the same way. What is
compiled is what vLLM's xgrammar backend compiles: JSON with any whitespace (unless `disable_any_whitespace`),
properties in schema order, and none the schema does not list (xgrammar's strict mode). JSON-schema keywords
xgrammar accepts without enforcing (`not`, `multipleOf`, `if`/`then`/`else`, `dependentRequired`, ...) are a 400,
as is every option this server cannot honour: a constraint is never silently dropped.

Compiling runs in a worker thread (xgrammar releases the GIL while it compiles), so a large schema never stalls
the engine's steps; xgrammar's compiler caches each grammar it has compiled, keyed by the grammar and options.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from glmserve.serving.parsers.glm45 import TOOL_CLOSE, TOOL_OPEN
from glmserve.serving.structured_fields import StructuredOutputFields
from glmserve.serving.tokenizer import Tokenizer
from glmserve.types import GrammarConstraint, ParamError

THINK_CLOSE = "</think>"
# JSON-schema keywords xgrammar 0.2.9 accepts and ignores (found by compiling a schema each one forbids an
# instance of, and feeding it that instance): outputs could break them, so a schema using one is refused.
UNENFORCED_KEYWORDS = ("not", "multipleOf", "if", "then", "else", "dependentRequired", "dependentSchemas",
                       "dependencies", "unevaluatedItems", "$dynamicRef", "minContains", "maxContains", "uniqueItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "contains", "propertyNames", "additionalItems")
# Whitespace runs in JSON are capped (xgrammar's max_whitespace_cnt): uncapped, a model that prefers newlines
# (the embedded one does, after "{") can fill max_tokens with them and never close the object. Eight allows
# indented JSON a few levels deep.
MAX_WHITESPACE = 8
# In the EBNF xgrammar prints for a glm_xml structural tag with max_whitespace_cnt set.
# (whitespace_24{0, 8}, or whitespace_24_1{0, 8} in the second function's rules, ...).
_PADDING_AFTER_VALUE_OPEN = re.compile(r'"<arg_value>" whitespace\w*\{0, \d+\}')
_PADDING_BEFORE_VALUE_CLOSE = re.compile(r'whitespace\w*\{0, \d+\} "</arg_value>"')
_LENGTH_BOUNDED_CHAR = r'[^\"\\\r\n]'  # as xgrammar prints it
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'
# GLM-4.5's tool-call markup: each is one token of the vocabulary, the only spelling the model knows.
GLM_TOOL_MARKUP = (TOOL_OPEN, TOOL_CLOSE, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
# An EBNF string literal, or a character class (which may hold a quote: skipped whole).
_EBNF_LITERAL = re.compile(r'\[(?:[^\]\\]|\\.)*\]|"(?:[^"\\\n]|\\.)*"')
_EBNF_RULE_START = re.compile(r"\n(?=\w+ ::= )")
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[08:10:59] /project/cpp/x.cc:42: " before messages


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What to compile: kind is json_schema, json_object, regex, choice, ebnf, lark or glm_tool_calls."""

    kind: str
    value: Any
    param: str  # the request field it came from, named in errors
    any_whitespace: bool = True

    @classmethod
    def from_request(cls, req: StructuredOutputFields) -> GrammarSpec | None:
        """The grammar a request's structured-output fields ask for, or None; ParamError when they conflict or
        ask for something unsupported."""
        found = [spec for spec in (_from_response_format(req.response_format),
                                   _from_structured_outputs(req), _from_guided(req)) if spec is not None]
        found += _from_sglang(req)
        if len(found) > 1:
            names = ", ".join(s.param for s in found)
            raise ParamError(f"give one structured output constraint, not several ({names})", found[1].param)
        return found[0] if found else None


def _json_value(value: Any, param: str) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParamError(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise ParamError(f"{param} must be a JSON schema object", param)
    return value


def _from_response_format(response_format: dict | None) -> GrammarSpec | None:
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", None, "response_format")
    if kind != "json_schema":
        raise ParamError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                         "response_format")
    body = response_format.get("json_schema")
    if not isinstance(body, dict) or "schema" not in body:
        raise ParamError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                         "response_format")
    return GrammarSpec("json_schema", _json_value(body["schema"], "response_format"), "response_format")


def _from_structured_outputs(req: StructuredOutputFields) -> GrammarSpec | None:
    so = req.structured_outputs
    if so is None:
        return None
    param = "structured_outputs"
    if so.whitespace_pattern is not None:
        raise ParamError("structured_outputs.whitespace_pattern is not supported", param)
    if so.structural_tag is not None:
        raise ParamError("structured_outputs.structural_tag is not supported", param)
    given = {"json": so.json_schema, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
             "json_object": so.json_object or None}
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) != 1:
        raise ParamError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object", param)
    (key, value), = given.items()
    spec = _spec(key, value, f"{param}.{key}")
    return GrammarSpec(spec.kind, spec.value, spec.param, any_whitespace=not so.disable_any_whitespace)


def _from_guided(req: StructuredOutputFields) -> GrammarSpec | None:
    if req.guided_whitespace_pattern is not None:
        raise ParamError("guided_whitespace_pattern is not supported", "guided_whitespace_pattern")
    if req.guided_decoding_backend not in (None, "xgrammar", "auto"):
        raise ParamError(f"guided_decoding_backend {req.guided_decoding_backend!r} is not available (xgrammar)",
                         "guided_decoding_backend")
    given = [("json", req.guided_json, "guided_json"), ("regex", req.guided_regex, "guided_regex"),
             ("choice", req.guided_choice, "guided_choice"), ("grammar", req.guided_grammar, "guided_grammar")]
    given = [g for g in given if g[1] is not None]
    if len(given) > 1:
        raise ParamError(f"give one of {', '.join(g[2] for g in given)}", given[1][2])
    return _spec(*given[0]) if given else None


def _from_sglang(req: StructuredOutputFields) -> list[GrammarSpec]:
    given = [("json", req.json_schema, "json_schema"), ("regex", req.regex, "regex"), ("ebnf", req.ebnf, "ebnf")]
    return [_spec(*g) for g in given if g[1] is not None]


def _spec(key: str, value: Any, param: str) -> GrammarSpec:
    if key == "json":
        return GrammarSpec("json_schema", _json_value(value, param), param)
    if key == "json_object":
        return GrammarSpec("json_object", None, param)
    if key == "choice":
        if not value:
            raise ParamError(f"{param} needs at least one choice", param)
        return GrammarSpec("choice", list(value), param)
    if not value:
        raise ParamError(f"{param} must not be empty", param)
    if key == "grammar":  # vLLM's rule: EBNF defines rules with ::=, Lark with a colon
        key = "ebnf" if "::=" in value else "lark"
    return GrammarSpec(key, value, param)


def check_json_schema(schema: Any, param: str, path: str = "#") -> None:
    """ParamError naming the first keyword xgrammar would not enforce, at its JSON pointer."""
    if not isinstance(schema, dict):
        return
    for keyword in UNENFORCED_KEYWORDS:
        if keyword in schema:
            raise ParamError(f"{param}: the JSON schema keyword {keyword!r} (at {path}) is not supported", param)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                check_json_schema(sub, param, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                check_json_schema(sub, param, f"{path}/{key}/{i}")
    for key in _SUBSCHEMAS:
        check_json_schema(schema.get(key), param, f"{path}/{key}")


def json_schema_ebnf(schema: dict, any_whitespace: bool = True) -> str:
    """xgrammar's EBNF for a JSON schema, its length-bounded strings fixed (see `_without_raw_control_chars`)."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=any_whitespace,
                                           max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
    return _without_raw_control_chars(str(grammar))


def _without_raw_control_chars(ebnf: str) -> str:
    """xgrammar 0.2.9 writes the characters of a JSON string with minLength or maxLength as [^"\\\r\n], which
    lets a tab or any other control character in raw, and JSON forbids that: they are excluded here (such strings
    admit no escapes, so a control character cannot be written in them at all)."""
    return ebnf.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)


def glm_tool_call_ebnf(structural_tag: dict, tokenizer: Tokenizer) -> str:
    """The EBNF of a structural tag of GLM tool calls (tool_grammar.py), with three fixes to what xgrammar writes:

    - no whitespace just inside `<arg_value>...</arg_value>` (which the `glm_xml` style allows): GLM-4.5 writes a
      string value verbatim, and the tool-call parser keeps it so, so padding there would become part of an enum
      or pattern value;
    - the markup (`<arg_key>`, `</arg_value>`, `</tool_call>`, ...) only as its own token, and each argument key
      only in its own tokens (the tokenizer's, which are the same wherever the key stands: between two markup
      tokens): spelled as text, the grammar also allows them in pieces (`<`, `/`, `arg`, ...; `o`, `u`, `t`), which
      the model picks when the token it wants is masked (a key it would rather not write, or not end), and after
      a spelling it never saw, it loses the thread and repeats itself inside the next value until max_tokens."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_structural_tag(xgr.StructuralTag.model_validate(structural_tag)))
    ebnf = _PADDING_AFTER_VALUE_OPEN.sub('"<arg_value>"', ebnf)
    ebnf = _without_raw_control_chars(_PADDING_BEFORE_VALUE_CLOSE.sub('"</arg_value>"', ebnf))
    return _markup_as_tokens(ebnf, tokenizer)


def _markup_as_tokens(ebnf: str, tokenizer: Tokenizer) -> str:
    """Each markup string inside an EBNF string literal becomes xgrammar's `Token(id)`, and a key after
    `<arg_key>` its tokens, in every rule but the TagDispatch ones (their triggers and excludes are matched as
    text: free text before `<tool_call>`, and values, which may not spell markup in any tokens). A key with an
    escape in the EBNF (a quote, a backslash, a control character) stays text."""
    markup_ids = {m: tokenizer.token_to_id(m) for m in GLM_TOOL_MARKUP if tokenizer.token_to_id(m) is not None}
    if not markup_ids:
        return ebnf
    markup = re.compile("|".join(map(re.escape, sorted(markup_ids, key=len, reverse=True))))
    key_open = markup_ids.get("<arg_key>")

    def text(parts: list[str], body: str) -> list[str]:
        if parts and parts[-1] == f"Token({key_open})" and body and "\\" not in body:  # a key
            return [f"Token({t})" for t in tokenizer.encode(body)]
        return [f'"{body}"'] if body else []

    def split(literal: re.Match) -> str:
        if literal.group(0).startswith("["):
            return literal.group(0)
        body, parts, pos = literal.group(0)[1:-1], [], 0
        for found in markup.finditer(body):
            parts += text(parts, body[pos:found.start()])
            parts.append(f"Token({markup_ids[found.group(0)]})")
            pos = found.end()
        if not parts:
            return literal.group(0)
        return "(" + " ".join(parts + text(parts, body[pos:])) + ")"

    rules = _EBNF_RULE_START.split(ebnf)
    return "\n".join(rule if "::= TagDispatch(" in rule else _EBNF_LITERAL.sub(split, rule) for rule in rules)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings (a JSON string literal is an EBNF one too, escapes included)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputCompiler:
    """The server's grammar compiler: xgrammar's, over the tokenizer's vocabulary padded to the model's, built
    at the first request that needs it (with the model's vocabulary size, known once the engine has loaded)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._compiler = None
        self._vocabulary = None  # the xgrammar TokenizerInfo the compiler holds
        self._lock = threading.Lock()
        self.think_close_id = tokenizer.token_to_id(THINK_CLOSE)

    def _get_compiler(self, vocab_size: int):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr  # with the transformers it imports: only for servers that get a grammar

                self._vocabulary = _tokenizer_info(xgr, self._tokenizer, vocab_size)
                self._compiler = xgr.GrammarCompiler(self._vocabulary, max_threads=1)
            return self._compiler

    async def compile(self, spec: GrammarSpec, vocab_size: int, thinking: bool = False) -> GrammarConstraint:
        """`compile_now` in a worker thread (xgrammar releases the GIL while compiling)."""
        return await asyncio.to_thread(self.compile_now, spec, vocab_size, thinking)

    def compile_now(self, spec: GrammarSpec, vocab_size: int, thinking: bool = False) -> GrammarConstraint:
        """The compiled constraint, starting after `</think>` when the output begins with reasoning; ParamError
        (400) when the grammar does not compile."""
        if spec.kind == "json_schema":
            check_json_schema(spec.value, spec.param)
        compiled = self._compile(spec, vocab_size)
        return GrammarConstraint(compiled, self.think_close_id if thinking else None, spec.kind, self._vocabulary)

    def _compile(self, spec: GrammarSpec, vocab_size: int):
        compiler = self._get_compiler(vocab_size)
        try:
            if spec.kind == "json_schema":
                return compiler.compile_grammar(json_schema_ebnf(spec.value, spec.any_whitespace))
            if spec.kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.value))
            if spec.kind == "ebnf":
                return compiler.compile_grammar(spec.value)
            if spec.kind == "lark":
                return compiler.compile_lark(spec.value)
            return compiler.compile_grammar(glm_tool_call_ebnf(spec.value, self._tokenizer))
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and conversion errors
            message = _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            raise ParamError(f"{spec.param}: the grammar does not compile: {message}", spec.param) from None


def _tokenizer_info(xgr, tokenizer: Tokenizer, vocab_size: int):
    """xgrammar's view of the vocabulary: each id's string as tokenizer.json stores it (byte-level encoded).
    Special added tokens (role tokens, [gMASK], ...) and ids past the tokenizer get no text, so no grammar can
    produce them; the markup tokens (`<think>`, `<tool_call>`, `<arg_key>`, ...) are not special, and stay the
    text they spell, which GLM's tool-call grammar needs."""
    encoded = [""] * vocab_size
    special = tokenizer.special_token_ids
    for token, token_id in tokenizer.vocab().items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend_json())
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    return xgr.TokenizerInfo(encoded, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stop, add_prefix_space=metadata["add_prefix_space"])
