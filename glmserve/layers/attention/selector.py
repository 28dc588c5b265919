"""--attention-backend NAME → an AttentionBackend."""

from __future__ import annotations

from glmserve.layers.attention.backend import AttentionBackend
from glmserve.layers.attention.blockwise import TorchBlockwiseBackend
from glmserve.layers.attention.cpu_native import CpuNativeBackend
from glmserve.layers.attention.reference import TorchNativeBackend

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    CpuNativeBackend.name: CpuNativeBackend,
    TorchBlockwiseBackend.name: TorchBlockwiseBackend,
    TorchNativeBackend.name: TorchNativeBackend,
}
# Chosen with benchmarks/long_context.py (BENCHMARKS.md): the native kernel for decode and short queries, and
# torch_blockwise (which reads the cache in place too, and whose memory per step does not grow with the batch's
# longest sequence) for prefill chunks and wherever the native extension is unavailable.
DEFAULT_ATTENTION_BACKEND = CpuNativeBackend.name


def get_attention_backend(name: str | None = None) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name or DEFAULT_ATTENTION_BACKEND]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}") from None
