"""The memory-bandwidth roofline of decode: a decode step reads the weights it uses once, so no engine can decode
faster than (measured bandwidth) / (bytes of weights one step reads) steps per second. KV-cache reads are left
out (small beside the weights at the lengths these benchmarks use), which keeps the bound an upper one."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from glmserve.kernels import native

GIB = 2**30


def weight_params(directory: Path) -> dict:
    """Parameter counts from the safetensors headers (see count_weight_params)."""
    from safetensors import safe_open

    def sizes():
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    yield name, math.prod(f.get_slice(name).get_shape())

    return count_weight_params(json.loads((directory / "config.json").read_text()), sizes())


def count_weight_params(config: dict, sizes: Iterable[tuple[str, int]]) -> dict:
    """Parameter counts from (tensor name, element count) pairs: a checkpoint's, or a loaded model's (its stacked
    experts are still named `.mlp.experts.`). `per_decode_token` is what one decode token reads: the embedding
    table is a row lookup, so it is left out, and routed experts count top_k / n_experts of theirs."""
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    total = embedding = routed = mtp = 0
    for name, n in sizes:
        total += n
        if name.startswith(mtp_prefix):
            mtp += n
        elif name == "model.embed_tokens.weight":
            embedding += n
        elif ".mlp.experts." in name:
            routed += n
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    lm_head = config["vocab_size"] * config["hidden_size"]
    return {"total": total, "embedding": embedding, "lm_head": lm_head, "mtp": mtp,
            "non_embedding": total - mtp - embedding - (0 if config.get("tie_word_embeddings") else lm_head),
            "routed_experts": routed, "n_routed_experts": experts, "num_experts_per_tok": top_k,
            "per_decode_token": total - mtp - embedding - routed + routed * top_k // experts}


def params_per_decode_step(params: dict, batch: int) -> float:
    """Weights a decode step of `batch` sequences reads: everything but the routed experts once, and of each MoE
    layer's experts those at least one token picks, E·(1 − (1 − k/E)^b) in expectation under uniform routing."""
    return _shared_params(params) + _routed_params_read(params, batch)


def _shared_params(params: dict) -> float:
    """What every decode token reads besides the routed experts."""
    routed_per_token = params["routed_experts"] * params["num_experts_per_tok"] // params["n_routed_experts"]
    return params["per_decode_token"] - routed_per_token


def _routed_params_read(params: dict, batch: int) -> float:
    """The routed experts' weights a step of `batch` sequences reads, in expectation under uniform routing."""
    experts, top_k = params["n_routed_experts"], params["num_experts_per_tok"]
    return params["routed_experts"] * (1 - (1 - top_k / experts) ** batch)


def _best_time(fn, reps: int, sync) -> float:
    """Fastest of reps: what the hardware does when no other process competes for memory."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(device: torch.device, size_bytes: int = GIB, reps: int = 5) -> dict:
    """GB/s (1e9 bytes/s) on fp32 tensors of `size_bytes`, best of `reps`: `sum` (read), `copy_` (read + write,
    both counted), a GEMV over a square matrix (batch-1 decode's access pattern) and, on CPU with the native
    extension, its plain streaming read (`stream_read`: torch's `sum` alone read slower than our own GEMVs on some
    CPUs). The roofline takes the fastest read, so that it is the strict bound."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = size_bytes // 4
    x = torch.ones(n, device=device)
    read = size_bytes / _best_time(lambda: x.sum(), reps, sync) / 1e9
    reads = {"sum_read_GBps": read}
    ext = native.extension() if device.type == "cpu" else None
    if ext is not None:
        reads["native_read_GBps"] = size_bytes / _best_time(lambda: ext.stream_read(x), reps, sync) / 1e9
    y = torch.empty_like(x)
    copy = 2 * size_bytes / _best_time(lambda: y.copy_(x), reps, sync) / 1e9
    y = None  # free it before the GEMV
    side = int(n**0.5)
    w, v = x[: side * side].view(side, side), torch.ones(side, device=device)
    reads["gemv_read_GBps"] = side * side * 4 / _best_time(lambda: torch.mv(w, v), reps, sync) / 1e9
    x = w = None
    gc.collect()
    return {**reads, "copy_read_write_GBps": copy, "roofline_GBps": max(reads.values())}


def roofline_tps(params: dict, batch: int, bytes_per_param: int, bandwidth_GBps: float,
                 fp16_params: int = 0, fp16_experts: bool = False) -> float:
    """The decode tokens/s at `batch` that reading the weights alone allows. With --weight-dtype float16,
    `fp16_params` of the weights every step reads (linear layers) are stored in 2 bytes, and so are the routed
    experts' when `fp16_experts`."""
    saved = fp16_params + (_routed_params_read(params, batch) if fp16_experts else 0)
    step_bytes = params_per_decode_step(params, batch) * bytes_per_param - saved * (bytes_per_param - 2)
    return batch * bandwidth_GBps * 1e9 / step_bytes
