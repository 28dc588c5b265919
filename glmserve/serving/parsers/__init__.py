"""Output parsers (reasoning, tool calls) for the OpenAI-compatible server."""

from .glm45 import Glm45StreamParser, merge_deltas, parse_output

__all__ = ["Glm45StreamParser", "merge_deltas", "parse_output"]
