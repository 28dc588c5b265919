"""One attention layer's paged KV cache: K and V in their storage dtype, with per-tensor scales for FP8.

Both tensors are [num_blocks * block_size, kv_heads, head_dim]: a token's slot is block_id * block_size + offset,
and `blocks(...)` views the same memory as [num_blocks, block_size, kv_heads, head_dim] for block-wise reads.
With an FP8 storage dtype a value is stored as value / scale in one byte (saturated to the format's range, as
vLLM's CPU path does) and read back as stored * scale; the backends fold the scales into the query and the output
instead of scaling every key and value they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.layers.attention.huge_pages import huge_page_zeros

# --kv-cache-dtype values (config.KV_CACHE_DTYPES, canonical) → storage dtype; None: the compute dtype.
KV_STORAGE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
                     "fp8_e5m2": torch.float8_e5m2}


K_SCALE_CONSTANT, V_SCALE_CONSTANT = 200.0, 100.0  # vLLM's defaults for --calculate-kv-scales
_SMALLEST_SCALE = 1e-8  # all-zero first keys must not give a zero scale


def kv_storage_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    return KV_STORAGE_DTYPES[kv_cache_dtype] or compute_dtype


@dataclass(slots=True)
class PagedKVCache:
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    k_scale: float = 1.0  # stored = value / scale (the runner sets scales for FP8 storage only)
    v_scale: float = 1.0
    # --calculate-kv-scales: the scales come from the first keys and values written (vLLM's rule: |K|max / 200,
    # |V|max / 100, leaving room for larger values later), then stay fixed.
    calculate_scales: bool = False
    # FP8: the fp32 value of each of the 256 bytes; a table lookup dequantizes several times faster than torch's
    # float8 cast on CPU (BENCHMARKS.md).
    table: torch.Tensor | None = None

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0,
                 calculate_scales: bool = False) -> PagedKVCache:
        shape = (num_blocks * block_size, kv_heads, head_dim)
        if device.type == "cpu":  # decode reads blocks all over the pool: fewer TLB misses on huge pages
            k, v = huge_page_zeros(shape, dtype), huge_page_zeros(shape, dtype)
        else:
            k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, v, block_size, k_scale, v_scale, calculate_scales)

    def __post_init__(self) -> None:
        if self.quantized and self.table is None:
            codes = torch.arange(256, dtype=torch.int32, device=self.k.device).to(torch.uint8)
            self.table = codes.view(self.k.dtype).float()

    @property
    def quantized(self) -> bool:
        return self.k.dtype.itemsize == 1

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] in the compute dtype, written to slots slot_mapping [T] as value / scale."""
        if self.calculate_scales:
            self.k_scale = max(k.abs().max().item() / K_SCALE_CONSTANT, _SMALLEST_SCALE)
            self.v_scale = max(v.abs().max().item() / V_SCALE_CONSTANT, _SMALLEST_SCALE)
            self.calculate_scales = False
        for cache, x, scale in ((self.k, k, self.k_scale), (self.v, v, self.v_scale)):
            if scale != 1.0:
                x = x / scale
            if self.quantized:  # saturate (e4m3fn has no inf: an overflowing cast would give NaN)
                limit = torch.finfo(cache.dtype).max
                stored = x.clamp(-limit, limit).to(cache.dtype)
                # index_copy_ has no float8 kernel on CPU: copy the bytes.
                cache.view(torch.uint8).index_copy_(0, slot_mapping, stored.view(torch.uint8))
            else:
                cache.index_copy_(0, slot_mapping, x.to(cache.dtype))

    def blocks(self, cache: torch.Tensor) -> torch.Tensor:
        """cache (self.k or self.v) viewed as [num_blocks, block_size, kv_heads, head_dim]; no copy."""
        return cache.view(-1, self.block_size, *cache.shape[1:])

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys or values read from this cache, in dtype and still divided by their scale."""
        if stored.dtype == dtype:
            return stored
        if self.table is None:
            return stored.to(dtype)
        codes = stored.reshape(-1).view(torch.uint8).int()
        return self.table.index_select(0, codes).view(stored.shape).to(dtype)
