"""Linear layers that own their weight loading, nano-vllm style.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's slice of a
checkpoint tensor into place, so the loader never guesses sharding from names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.distributed import ParallelContext


def _copy_checked(param: nn.Parameter, target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
    target.copy_(loaded)


def take_shard(loaded: torch.Tensor, dim: int, index: int, size: int, total: int) -> torch.Tensor:
    """Slice `index` (of length `size`) along `dim`, after checking the checkpoint's full length there."""
    if loaded.dim() <= dim or loaded.shape[dim] != total:
        raise ValueError(f"shape mismatch: expected {total} along dim {dim}, checkpoint has {tuple(loaded.shape)}")
    return loaded.narrow(dim, index * size, size)


PREPACK_MIN_ELEMENTS = 1 << 19  # 2 MiB of fp32: below it F.linear wins at every batch size measured
# oneDNN keeps memory for every distinct row count it has seen (measured: +2.2 GiB after 2,000 distinct counts on
# one [4096, 512] weight, and it outlives ONEDNN_PRIMITIVE_CACHE_CAPACITY), so a server whose prefill chunks vary
# would grow without bound. Up to 128 rows (decode steps) the packed path is 1.1-2.5x faster and its memory
# plateaus (+40 MiB); above, F.linear is within 15% and keeps nothing.
PACKED_MAX_ROWS = 128


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # oneDNN-blocked fp32 copy (prepack_for_cpu)
        self.fp16_weight: torch.Tensor | None = None  # fbgemm-packed fp16 weight and bias (prepack_for_cpu)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_checked(param, param.data, loaded)

    def prepack_for_cpu(self, weight_dtype: torch.dtype = torch.float32) -> None:
        """Keep a large weight in a faster form for fp32 compute on CPU. Call once, after loading.

        float32: a oneDNN-blocked copy (what inductor's CPU weight freezing does), 1.5-2.5x faster than F.linear's
        MKL path for the decode shapes. float16: the weight stored in half precision and widened to fp32 inside
        fbgemm's GEMM, which reads half the bytes (decode on CPU is bound by weight reads): measured 2x faster at
        1 row on the [32000, 512] lm_head, 1.6x at 8; its fp32 copy is dropped. A oneDNN call costs ~35 us more
        than F.linear, though, which is 2-10x F.linear's whole time on a small weight (measured on
        [128-512, 128-512]), and fbgemm's fp16 gains nothing there, so small weights stay as they are."""
        if self.weight.numel() < PREPACK_MIN_ELEMENTS:
            return
        if weight_dtype == torch.float16:
            bias = None if self.bias is None else self.bias.detach()
            self.fp16_weight = torch.ops.quantized.linear_prepack_fp16(self.weight.detach(), bias)
            self.weight.data = torch.empty(0)
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16_weight is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.fp16_weight)
        if self.packed_weight is not None and x.shape[0] <= PACKED_MAX_ROWS and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias, ParallelContext())


class ColumnParallelLinear(LinearBase):
    """Output features split across TP ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__(in_features, parallel.shard(out_features, "output features"), bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size, tp = param.shape[0], self.parallel
        _copy_checked(param, param.data, take_shard(loaded, 0, tp.tp_rank, size, size * tp.tp_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stacked on the output dim (gate_proj + up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, parallel: ParallelContext):
        self.out_sizes = [parallel.shard(s, "output features") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size, tp = self.out_sizes[shard_id], self.parallel
        target = param.data.narrow(0, sum(self.out_sizes[:shard_id]), size)
        _copy_checked(param, target, take_shard(loaded, 0, tp.tp_rank, size, size * tp.tp_size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across TP ranks (KV heads replicated if fewer)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 parallel: ParallelContext):
        self.num_heads = parallel.shard(num_heads, "attention heads")
        self.total_kv_heads = num_kv_heads
        self.num_kv_heads = max(1, num_kv_heads // parallel.tp_size)
        self.kv_replicas = max(1, parallel.tp_size // num_kv_heads)
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden, out, bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        q, kv, tp = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.parallel
        kv_rank = tp.tp_rank // self.kv_replicas
        offset, size, rank, total = {"q": (0, q, tp.tp_rank, q * tp.tp_size),
                                     "k": (q, kv, kv_rank, self.total_kv_heads * self.head_dim),
                                     "v": (q + kv, kv, kv_rank, self.total_kv_heads * self.head_dim)}[shard_id]
        _copy_checked(param, param.data.narrow(0, offset, size), take_shard(loaded, 0, rank, size, total))


class RowParallelLinear(LinearBase):
    """Input features split across TP ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__(parallel.shard(in_features, "input features"), out_features, bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            _copy_checked(param, param.data, loaded if self.parallel.tp_rank == 0 else torch.zeros_like(loaded))
            return
        size, tp = param.shape[1], self.parallel
        _copy_checked(param, param.data, take_shard(loaded, 1, tp.tp_rank, size, size * tp.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self._linear(x))
