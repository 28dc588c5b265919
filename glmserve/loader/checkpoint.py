"""A Hugging Face checkpoint directory's safetensors files, read lazily and memory-mapped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"


class LoaderError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shards named by the index, or the directory's *.safetensors files when there is no index."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoaderError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoaderError(f"checkpoint shard(s) named in {index.name} not found in {model_dir}: "
                              f"{', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoaderError(f"no *.safetensors files in {model_dir}")
    return files


def iterate_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file; tensors are memory-mapped views until copied."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise LoaderError(f"cannot read {path}: {e}") from None


def count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                total += len(f.keys())
        except SafetensorError as e:
            raise LoaderError(f"cannot read {path}: {e}") from None
    return total


class TensorLookup:
    """Any tensor of the checkpoint by name, wherever it is stored (an fp8 weight's scale can sit in another
    shard); each file is opened once and stays open while the lookup lives."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                self._where.update(dict.fromkeys(f.keys(), path))
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor | None:
        path = self._where.get(name)
        if path is None:
            return None
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)
