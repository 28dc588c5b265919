"""Output parsers (reasoning, tool calls) for the OpenAI-compatible server."""

from .glm45 import Glm45StreamParser, merge_deltas, parse_output

__all__ = ["Glm45StreamParser", "merge_deltas", "parse_output", "check_parser_names"]

REASONING_PARSERS = ("glm45",)
TOOL_CALL_PARSERS = ("glm45",)


def check_parser_names(reasoning_parser: str | None, tool_call_parser: str | None) -> None:
    """Raise ValueError, naming the flag, for a parser glmserve does not have."""
    for flag, value, known in (("--reasoning-parser", reasoning_parser, REASONING_PARSERS),
                               ("--tool-call-parser", tool_call_parser, TOOL_CALL_PARSERS)):
        if value is not None and value not in known:
            raise ValueError(f"{flag} {value!r} is not supported; choose from {', '.join(known)}, or none (off)")
