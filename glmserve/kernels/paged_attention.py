"""The native paged-attention kernel's entry point (csrc/paged_attention*.cpp): decode, draft verification and
prefill chunks attending to their sequences' keys where they lie in the paged KV cache.

Its torch references are layers.attention's torch_native and torch_blockwise backends, which the tests hold it to;
the cpu_native backend (layers/attention/cpu_native.py) calls it and falls back to torch_blockwise where it does not
run (no extension, not fp32 on CPU).
"""

from __future__ import annotations

import torch

from glmserve.kernels import native

# How the KV cache may store values for this kernel (PagedKVCache's storage dtypes).
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def runs_natively(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (native.extension() is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.device.type == "cpu" and k_cache.dtype in KV_DTYPES)


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, block_size: int, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0, isa: str | None = None) -> None:
    """out = causal attention of q's rows ([T, H, D] fp32) over their cached keys.

    k_cache, v_cache: [slots, Hk, D] (H a multiple of Hk; query head h reads KV head h // (H / Hk)), stored values
    times k_scale / v_scale are the keys and values. Sequence b's query rows are query_start_loc[b]..[b + 1] at the
    positions that end at seq_lens[b] - 1, its keys in the blocks block_tables[b] names. Index tensors are int64 on
    the CPU. Only call when runs_natively(q, k_cache)."""
    native.extension().paged_attention(q.contiguous(), k_cache, v_cache, block_tables, block_size, seq_lens,
                                       query_start_loc, out, scale, k_scale, v_scale, native.isa_index(isa))
