"""cpu_native: the native paged-attention kernel (glmserve.kernels.paged_attention) for every query of a step
(decode, verification, prefill chunks), and torch_blockwise where the kernel does not run (no native extension,
not on CPU, not fp32): the default backend.

The kernel reads each K/V row once for all the query rows that share its KV head (GQA; a prefill chunk's queries
in blocks), folds tiles of keys into an online softmax in fp32, and splits long contexts into key ranges run on
every thread (flash-decoding), merged at the end; the cache's storage dtype (fp32, bf16, fp8) is widened inside
it, scales folded in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.kernels import native
from glmserve.kernels.paged_attention import paged_attention, runs_natively
from glmserve.layers.attention.backend import AttentionBackend
from glmserve.layers.attention.blockwise import BlockwisePlan, TorchBlockwiseBackend
from glmserve.layers.attention.kv_cache import PagedKVCache
from glmserve.layers.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class NativePlan:
    block_tables: torch.Tensor  # [B, max_blocks] int64, CPU
    seq_lens: torch.Tensor  # [B] int64
    query_start_loc: torch.Tensor  # [B + 1] int64
    fallback: BlockwisePlan | None = None  # the whole step on torch_blockwise, made when first needed


class CpuNativeBackend(AttentionBackend):
    name = "cpu_native"
    isa: str | None = None  # the kernel's ISA path (None: native's default; tests force each)

    def __init__(self) -> None:
        self.blockwise = TorchBlockwiseBackend()

    def plan(self, meta: AttentionMetadata, block_tables: torch.Tensor, device: torch.device) -> object:
        if native.extension() is None or device.type != "cpu":
            return self.blockwise.plan(meta, block_tables, device)
        return NativePlan(block_tables.contiguous(), torch.tensor(meta.seq_lens, dtype=torch.long),
                          torch.tensor(meta.query_start_loc, dtype=torch.long))

    def attend(self, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        plan = meta.plan
        if isinstance(plan, BlockwisePlan):
            return self.blockwise.attend(q, cache, meta, scale)
        out = q.new_empty(q.shape)
        if not runs_natively(q, cache.k):  # e.g. a bf16 model on CPU
            if plan.fallback is None:
                plan.fallback = self.blockwise.plan(meta, plan.block_tables, q.device)
            return self.blockwise.attend_planned(out, q, cache, meta, plan.fallback, scale)
        paged_attention(out, q, cache.k, cache.v, plan.block_tables, cache.block_size, plan.seq_lens,
                        plan.query_start_loc, scale, cache.k_scale, cache.v_scale, self.isa)
        return out
