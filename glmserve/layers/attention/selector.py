"""--attention-backend NAME → an AttentionBackend."""

from __future__ import annotations

from glmserve.layers.attention.backend import AttentionBackend
from glmserve.layers.attention.blockwise import TorchBlockwiseBackend
from glmserve.layers.attention.reference import TorchNativeBackend

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchBlockwiseBackend.name: TorchBlockwiseBackend,
    TorchNativeBackend.name: TorchNativeBackend,
}
# Chosen with benchmarks/long_context.py (BENCHMARKS.md): as fast at short contexts, faster at long ones, and its
# memory per step does not grow with the batch's longest sequence.
DEFAULT_ATTENTION_BACKEND = TorchBlockwiseBackend.name


def get_attention_backend(name: str | None = None) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name or DEFAULT_ATTENTION_BACKEND]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}") from None
