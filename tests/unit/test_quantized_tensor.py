"""A checkpoint's quantized weight (values + per-group scales) sharded like a tensor: each shard stands for the same
values as the dequantized weight's shard, keeping its scales where the shard starts on a group boundary."""

import pytest
import torch

from glmserve.kernels import quantize_int8
from glmserve.layers.quantization import QuantizedTensor
from glmserve.layers.quantization.scaled import quantize_fp8


@pytest.fixture
def weight() -> QuantizedTensor:
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    values, scales = quantize_fp8(w, 16)  # groups 0-15, 16-31, 32-39 (a short last group)
    return QuantizedTensor(values, scales, 16)


@pytest.mark.parametrize("dim,start,length,kept", [
    (0, 4, 6, True),  # rows: values and scales rows
    (1, 16, 24, True),  # from a group boundary to the end, the short group included
    (1, 0, 16, True),  # one whole group
    (1, 18, 10, True),  # inside one group: its scale covers the slice
    (1, 8, 16, False),  # across a boundary, starting inside a group: dequantized
])
def test_a_shard_stands_for_the_dequantized_shard(weight, dim, start, length, kept):
    shard = weight.narrow(dim, start, length)
    assert isinstance(shard, QuantizedTensor) == kept
    got = shard.dequantize() if kept else shard
    assert torch.equal(got, weight.dequantize().narrow(dim, start, length))


def test_fp8_quantization_rounds_within_e4m3s_precision():
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    values, scales = quantize_fp8(w, 32)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (8, 4)
    back = QuantizedTensor(values, scales, 32).dequantize()
    group_max = torch.nn.functional.pad(w.abs(), (0, 28)).view(8, 4, 32).amax(-1).repeat_interleave(32, 1)[:, :100]
    # 3 mantissa bits: half a step is 1/16 of the value; below 2^-6 of the group's max, e4m3's subnormals' step.
    assert ((back - w).abs() <= w.abs() / 16 + group_max / 448 * 2**-9 + 1e-7).all()
    assert (values.float().abs().amax(-1) == 448).all()  # each row's largest value uses the whole range


def test_int8_quantized_tensor_dequantizes_like_the_kernels_reference():
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    q, s = quantize_int8(w, 32)
    assert (QuantizedTensor(q, s, 32).dequantize() - w).abs().max() <= s.max() / 2 + 1e-6
