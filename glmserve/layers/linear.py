"""Linear layers that own their weight loading, nano-vllm style.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that stores this rank's slice of a
checkpoint tensor (in the layer's QuantMethod's format), so the loader never guesses sharding from names.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.distributed import ParallelContext
from glmserve.layers.lora import LinearLoRASlots, LoRABatch
from glmserve.layers.quantization import QuantMethod, UnquantizedMethod


def _check_shape(expected: tuple[int, ...], loaded) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch: expected {expected}, checkpoint has {tuple(loaded.shape)}")


def take_shard(loaded: torch.Tensor, dim: int, index: int, size: int, total: int) -> torch.Tensor:
    """Slice `index` (of length `size`) along `dim`, after checking the checkpoint's full length there."""
    if loaded.dim() <= dim or loaded.shape[dim] != total:
        raise ValueError(f"shape mismatch: expected {total} along dim {dim}, checkpoint has {tuple(loaded.shape)}")
    return loaded.narrow(dim, index * size, size)


class LinearBase(nn.Module):
    """The weight is held by a QuantMethod (float by default), which also computes the product. With LoRA
    serving, `lora` holds the adapters' weights for this layer and forward adds each row's delta."""

    lora: LinearLoRASlots | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext,
                 quant_method: QuantMethod | None = None):
        super().__init__()
        self.parallel = parallel
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_linear(self, out_features, in_features)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        self._store(param, 0, self.out_features, loaded)

    def _store(self, param: nn.Parameter, row: int, rows: int, loaded) -> None:
        """Rows row .. row + rows of the weight or bias from `loaded` (a checkpoint tensor's shard)."""
        if param is self.bias:
            _check_shape((rows,), loaded)
            param.data.narrow(0, row, rows).copy_(loaded)
            return
        _check_shape((rows, self.in_features), loaded)
        self.quant_method.load_rows(self, "weight", None, row, loaded)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_linear(self)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply_linear(self, x, self.bias)

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        return out if lora is None or self.lora is None else self.lora.add_to(out, x, lora)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        return self._add_lora(self._linear(x), x, lora)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_method: QuantMethod | None = None):
        super().__init__(in_features, out_features, bias, ParallelContext(), quant_method)


class ColumnParallelLinear(LinearBase):
    """Output features split across TP ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext,
                 quant_method: QuantMethod | None = None):
        super().__init__(in_features, parallel.shard(out_features, "output features"), bias, parallel, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size, tp = self.out_features, self.parallel
        self._store(param, 0, size, take_shard(loaded, 0, tp.tp_rank, size, size * tp.tp_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stacked on the output dim (gate_proj + up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, parallel: ParallelContext,
                 quant_method: QuantMethod | None = None):
        self.out_sizes = [parallel.shard(s, "output features") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, parallel, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int = 0) -> None:
        size, tp = self.out_sizes[shard_id], self.parallel
        self._store(param, sum(self.out_sizes[:shard_id]), size,
                    take_shard(loaded, 0, tp.tp_rank, size, size * tp.tp_size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across TP ranks (KV heads replicated if fewer)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 parallel: ParallelContext, quant_method: QuantMethod | None = None):
        self.num_heads = parallel.shard(num_heads, "attention heads")
        self.total_kv_heads = num_kv_heads
        self.num_kv_heads = max(1, num_kv_heads // parallel.tp_size)
        self.kv_replicas = max(1, parallel.tp_size // num_kv_heads)
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden, out, bias, parallel, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str = "q") -> None:
        q, kv, tp = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.parallel
        kv_rank = tp.tp_rank // self.kv_replicas
        offset, size, rank, total = {"q": (0, q, tp.tp_rank, q * tp.tp_size),
                                     "k": (q, kv, kv_rank, self.total_kv_heads * self.head_dim),
                                     "v": (q + kv, kv, kv_rank, self.total_kv_heads * self.head_dim)}[shard_id]
        self._store(param, offset, size, take_shard(loaded, 0, rank, size, total))


class RowParallelLinear(LinearBase):
    """Input features split across TP ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext,
                 quant_method: QuantMethod | None = None):
        super().__init__(parallel.shard(in_features, "input features"), out_features, bias, parallel, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param is self.bias:  # added once, on rank 0
            self._store(param, 0, self.out_features, loaded if self.parallel.tp_rank == 0 else torch.zeros_like(loaded))
            return
        size, tp = self.in_features, self.parallel
        self._store(param, 0, self.out_features, take_shard(loaded, 1, tp.tp_rank, size, size * tp.tp_size))

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        # (LoRA serving runs with one rank only: the delta is added to the whole output.)
        return self._add_lora(self.parallel.all_reduce(self._linear(x)), x, lora)
