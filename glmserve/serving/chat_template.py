"""Render a checkpoint's chat template the way transformers' `apply_chat_template(..., tokenize=False)` does.

The Jinja environment copies transformers' `_cached_compile_jinja_template` (transformers 5.x): an immutable
sandbox with `trim_blocks`/`lstrip_blocks` and `loopcontrols`, a `tojson` filter that does not HTML-escape and
defaults to `ensure_ascii=False`, the globals `raise_exception`, `strftime_now`, a restricted `dict` and a
`namespace` that refuses underscore attributes, and the `{% generation %}` tag (rendered as its body). Templates are
untrusted code from the checkpoint: everything they see is first rebuilt from plain JSON types.

`normalize_messages` is the separate, server-side step of GLM45.md §1.5 that turns OpenAI request messages into the
shape chat templates expect. `render_chat` alone renders exactly what it is given (GLM-4.5's `content: None`
renders as the text "None", example E12), so the server calls both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss ones read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template failed to compile or render, or the messages cannot be rendered (a client error)."""


def _jinja_version_ok() -> bool:
    # Older jinja2 releases have known sandbox escapes (CVE-2025-27516); transformers refuses them too.
    parts = []
    for part in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= (3, 1, 6)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and ' and would change the rendered prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself (its attributes lead to Python internals).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # A namespace whose underscore attributes could be used to reach CPython internals; refuse to store them.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]  # Jinja's signature trick, so `namespace(self=...)` still works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks trainable assistant text with `{% generation %}`; when rendering a prompt it is the body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    if not _jinja_version_ok():
        raise ChatTemplateError(f"jinja2>=3.1.6 is required to render chat templates, found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def _plain(value: Any) -> Any:
    """Rebuild `value` from exact JSON types: subclasses and arbitrary objects carry methods the sandbox trusts."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"  # templates only test media keys for presence, never read them


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render `messages` (already normalized, see `normalize_messages`) with a chat template.

    `template_kwargs` reach the template as variables: the request's `chat_template_kwargs` (e.g.
    `enable_thinking=False`) and, to match transformers, the tokenizer's `special_tokens_map`. Raises
    `ChatTemplateError` when the template fails (`raise_exception`, a sandbox violation, a type error).
    """
    compiled = _compile(template)
    context = {
        "documents": None,  # transformers always defines it
        **_plain(template_kwargs),
        "messages": _plain(messages),
        "tools": _plain(tools),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return compiled.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    except Exception as e:  # the template is untrusted code; any failure is this request's error
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


def _parse_arguments(arguments: Any) -> Any:
    # Templates iterate `arguments.items()`; OpenAI sends a JSON string (vLLM `_postprocess_messages`).
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"tool call arguments are not valid JSON: {arguments!r}") from e
    if not isinstance(parsed, dict):
        raise ChatTemplateError(f"tool call arguments must be a JSON object, got {arguments!r}")
    return parsed


def _normalize_tool_call(tool_call: Any) -> dict:
    if not isinstance(tool_call, Mapping):
        raise ChatTemplateError(f"a tool call must be an object, got {tool_call!r}")
    tool_call = dict(tool_call)
    function = tool_call.get("function")
    if isinstance(function, Mapping):
        tool_call["function"] = {**function, "arguments": _parse_arguments(function.get("arguments"))}
    elif "arguments" in tool_call or "name" in tool_call:  # the flat form templates also accept
        tool_call["arguments"] = _parse_arguments(tool_call.get("arguments"))
    return tool_call


def _is_text_part(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("type") == "text" and isinstance(item.get("text"), str)


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """OpenAI chat messages → what chat templates expect (GLM45.md §1.5, vLLM and transformers preprocessing).

    * keys whose value is None are dropped (transformers), and a missing `content` becomes "";
    * assistant `tool_calls`: `function.arguments` JSON strings become dicts, empty/None arguments `{}`; an empty
      `tool_calls` list is dropped;
    * `reasoning` / `thinking` are forwarded as `reasoning_content` (and `thinking`), as transformers aliases them;
    * list contents stay lists (templates join the text parts and skip images), except a tool message made only of
      text parts, which becomes their concatenated text: GLM-4.5 would otherwise print each part's Python repr.
    Messages may be dicts or pydantic models. The input is not modified.
    """
    normalized = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be an object, got {message!r}")
        m = {key: value for key, value in message.items() if value is not None}
        content = m.setdefault("content", "")
        if m.get("role") == "tool" and isinstance(content, list) and content and all(map(_is_text_part, content)):
            m["content"] = "".join(part["text"] for part in content)
        if "tool_calls" in m:
            if m["tool_calls"]:
                m["tool_calls"] = [_normalize_tool_call(tc) for tc in m["tool_calls"]]
            else:
                del m["tool_calls"]
        reasoning = next((m[key] for key in _REASONING_FIELDS if key in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        normalized.append(m)
    return normalized
