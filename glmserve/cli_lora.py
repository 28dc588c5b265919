"""LoRA serving flags, as vLLM names them (and SGLang's --lora-paths, --max-loras-per-batch), and their checks at
start-up: every --lora-modules adapter is read once here, so a bad one stops the server with a clear message."""

from __future__ import annotations

import argparse
import json


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters (vLLM's flags; SGLang's --lora-paths)")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT format)")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help='adapters to load at start-up: name=path, or JSON {"name": ..., "path": ..., '
                        '"base_model_name": ...}; requests name one as their `model`')
    g.add_argument("--lora-paths", nargs="+", default=[], metavar="NAME=PATH",
                   help="SGLang's spelling: name=path (or a path, named by itself); implies --enable-lora")
    g.add_argument("--max-loras", "--max-loras-per-batch", dest="max_loras", type=int, default=1,
                   help="adapters in one batch (default: 1)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default: 16)")
    g.add_argument("--max-cpu-loras", type=int, help="adapters kept read in memory (default: --max-loras)")


def _module(spec: str, sglang: bool) -> tuple[str, str]:
    spec = spec.strip()
    if spec.startswith("{"):
        entry = json.loads(spec)
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise ValueError(f"{spec!r}: the JSON form needs \"name\" and \"path\"")
        return entry["name"], entry["path"]
    name, sep, path = spec.partition("=")
    if not sep:
        if sglang:
            return spec, spec
        raise ValueError(f"{spec!r}: expected name=path")
    if not name or not path:
        raise ValueError(f"{spec!r}: expected name=path")
    return name, path


def lora_engine_fields(parser: argparse.ArgumentParser, args, model_config) -> dict:
    """EngineConfig's LoRA fields from the flags; every start-up adapter checked (parser.error if bad)."""
    from glmserve.loader.peft import read_peft_adapter
    from glmserve.types import AdapterError

    try:
        modules = tuple([_module(s, False) for s in args.lora_modules] + [_module(s, True) for s in args.lora_paths])
    except (ValueError, json.JSONDecodeError) as e:
        parser.error(f"--lora-modules / --lora-paths: {e}")
    enable = args.enable_lora or bool(args.lora_paths)
    if modules and not enable:
        parser.error("--lora-modules needs --enable-lora")
    for name, path in modules:
        try:
            read_peft_adapter(path, model_config, args.max_lora_rank)
        except AdapterError as e:
            parser.error(f"--lora-modules {name}={path}: {e}")
    return dict(enable_lora=enable, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras, lora_modules=modules)
