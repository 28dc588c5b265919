"""The quantization seam (vLLM's QuantizeMethodBase, kept small): a `QuantMethod` creates a layer's weights, stores
the checkpoint's rows into them as they stream in, processes them once after loading, and applies them.

Three kinds of layer hold one: linear layers (a weight [rows, cols]), the routed experts (w13 [E, 2I, H] gate then
up, w2 [E, H, I]) and the vocabulary embedding ([vocab, hidden], looked up by row). A method is stateless and shared
by every layer of a model; what it stores lives on the layer. Each weight parameter carries
`load_rows(expert, row, source)` and `logical_shape`, so the loader and `--load-format dummy` can fill any format
one slice at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from glmserve.kernels import dequantize


class QuantizedTensor:
    """A checkpoint weight stored quantized (an FP8 release's e4m3 values and their scales) in the kernels' layout:
    values [N, K], fp32 scales [N, ceil(K / group_size)]. Sharding narrows it like a tensor."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, group_size: int):
        self.values, self.scales, self.group_size = values, scales.float(), group_size

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dim(self) -> int:
        return self.values.dim()

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor | torch.Tensor:
        if dim == 0:
            return QuantizedTensor(self.values.narrow(0, start, length), self.scales.narrow(0, start, length),
                                   self.group_size)
        first, last = start // self.group_size, (start + length - 1) // self.group_size
        values = self.values.narrow(1, start, length)
        if first == last:  # inside one group: one scale per row covers the slice
            return QuantizedTensor(values, self.scales[:, first : first + 1], length)
        if start % self.group_size == 0:
            return QuantizedTensor(values, self.scales[:, first : last + 1], self.group_size)
        return self.dequantize().narrow(1, start, length)  # a shard boundary inside a group: requantized later

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.values, self.scales, self.group_size)


Source = torch.Tensor | QuantizedTensor


@dataclass(frozen=True, slots=True)
class NativeWeight:
    """A weight as the native kernels take it (kernels/reference.py's layouts), and the most activation rows for
    which the method's apply_* runs it on them (math.inf: any number); model/native_stack.py composes these."""

    weight: torch.Tensor
    scales: torch.Tensor | None
    group_size: int
    max_rows: float


def float_values(source: Source) -> torch.Tensor:
    return source.dequantize() if isinstance(source, QuantizedTensor) else source


class QuantMethod(ABC):
    """One weight format. `name` is what --quantization says (None for the float formats)."""

    name: str | None = None

    @property
    def vocab_method(self) -> QuantMethod:
        """The method of the vocabulary layers (embeddings and output heads): this one unless said otherwise."""
        return self

    # --- creating weights: each registers its parameters (and scale buffers) on the layer ---
    @abstractmethod
    def create_linear(self, layer: nn.Module, rows: int, cols: int) -> None:
        """`layer.weight`, a [rows, cols] weight."""

    @abstractmethod
    def create_experts(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int) -> None:
        """`layer.w13` [E, 2 * intermediate, hidden] and `layer.w2` [E, hidden, intermediate]."""

    @abstractmethod
    def create_embedding(self, layer: nn.Module, vocab: int, hidden: int) -> None:
        """`layer.weight`, a [vocab, hidden] table."""

    # --- loading ---
    @abstractmethod
    def load_rows(self, layer: nn.Module, name: str, expert: int | None, row: int, source: Source) -> None:
        """Stores source [n, cols] (the layer has checked its shape) as rows row .. row + n of weight `name`
        (of stacked `expert`)."""

    def process_linear(self, layer: nn.Module) -> None:
        """Once after loading: any repacking for the compute path."""

    def process_experts(self, layer: nn.Module) -> None:
        """Once after loading: any repacking for the compute path."""

    # --- computing ---
    @abstractmethod
    def apply_linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, cols] -> [M, rows]."""

    @abstractmethod
    def apply_experts(self, layer: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """The routed experts this rank holds: x [T, H]; weights, ids [T, k] (ids numbered in the model) ->
        this rank's partial sum [T, H]."""

    @abstractmethod
    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for token ids (any shape) -> [..., hidden]."""

    def native_linear(self, layer: nn.Module) -> NativeWeight | None:
        """The linear layer's weight as apply_linear hands it to kernels.linear (bias aside), for at most how many
        rows; None where apply_linear never does."""
        return None

    def native_experts(self, layer: nn.Module) -> tuple[NativeWeight, NativeWeight] | None:
        """(w13, w2) as apply_experts hands them to kernels.moe_experts, for at most how many tokens; None where it
        never does."""
        return None

    # --- shared by the methods ---
    def _register(self, layer: nn.Module, name: str, param: nn.Parameter, logical_shape: tuple[int, ...]) -> None:
        param.logical_shape = logical_shape  # [E,] rows, cols of the weight it stands for, whatever its storage
        param.load_rows = partial(self.load_rows, layer, name)
        layer.register_parameter(name, param)


def stacked_shape(num_experts: int | None, rows: int, cols: int) -> tuple[int, ...]:
    return (rows, cols) if num_experts is None else (num_experts, rows, cols)


def weight_rows(param: torch.Tensor, expert: int | None, row: int, count: int) -> torch.Tensor:
    """The rows row .. row + count of a weight (of one stacked expert), as a view to write into."""
    data = param.data if expert is None else param.data[expert]
    return data.narrow(0, row, count)
