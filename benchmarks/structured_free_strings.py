"""How many json_schema outputs of the embedded model end and validate: the 33 schemas of `structured_cases.py`,
streamed and not, thinking on and off, greedy, through `glmserve serve` (MTP on, as the API tests run it) and the
openai client; with `--compact`, the same schemas sent as `structured_outputs` with `disable_any_whitespace`;
`--penalty NAME=VALUE` adds a sampling penalty (repetition_penalty, frequency_penalty, presence_penalty), to see
whether breaking the loops lets the model end its strings. Each failure is listed with the start and end of its
output (where it loops).

    python benchmarks/structured_free_strings.py --max-tokens 300 --json benchmarks/results/free-strings-nano.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai

from glmserve.testing.server import start_server
from glmserve.testing.structured_cases import JSON_SCHEMAS

FLAGS = ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45", "--max-model-len", "2048",
         "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
         "--speculative-num-draft-tokens", "4"]


def _ask(client, model: str, schema: dict, stream: bool, thinking: bool, compact: bool, max_tokens: int,
         penalties: dict[str, float]):
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}, **penalties}
    kwargs = {"model": model, "temperature": 0, "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": "Give me an example record as JSON."}]}
    if compact:
        extra["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
    else:
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}
    if not stream:
        choice = client.chat.completions.create(**kwargs, extra_body=extra).choices[0]
        return choice.message.content or "", choice.finish_reason
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs, extra_body=extra):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return content, finish


def _valid(content: str, finish: str, schema: dict) -> bool:
    if finish != "stop":
        return False
    try:
        jsonschema.validate(json.loads(content), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--compact", action="store_true", help="disable_any_whitespace")
    parser.add_argument("--penalty", action="append", default=[], metavar="NAME=VALUE",
                        help="a sampling penalty for every request, e.g. repetition_penalty=1.3")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    args = parser.parse_args()
    penalties = {name: float(value) for name, value in (p.split("=") for p in args.penalty)}
    flags = FLAGS + (["--model", args.model] if args.model else [])
    server = start_server(flags, Path(tempfile.mkdtemp()) / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        cases = [(i, stream, thinking) for i in range(len(JSON_SCHEMAS)) for stream in (False, True)
                 for thinking in (False, True)]
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda c: _ask(client, model, JSON_SCHEMAS[c[0]], c[1], c[2], args.compact,
                                                   args.max_tokens, penalties), cases))
    finally:
        server.stop()
    rows = [{"schema": i, "stream": stream, "thinking": thinking, "finish_reason": finish,
             "valid": _valid(content, finish, JSON_SCHEMAS[i]), "head": content[:120], "tail": content[-60:]}
            for (i, stream, thinking), (content, finish) in zip(cases, outputs)]
    valid = sum(r["valid"] for r in rows)
    print(f"valid {valid}/{len(rows)} (max_tokens {args.max_tokens}, compact {args.compact}, {penalties})")
    for r in rows:
        if not r["valid"]:
            print(r["schema"], r["stream"], r["thinking"], r["finish_reason"], repr(r["head"]), "...", repr(r["tail"]))
    if args.json:
        args.json.write_text(json.dumps({"max_tokens": args.max_tokens, "compact": args.compact,
                                         "penalties": penalties, "valid": valid,
                                         "total": len(rows), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
