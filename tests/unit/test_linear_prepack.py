"""Large linear weights kept for fast fp32 compute on CPU: oneDNN-prepacked (equal to F.linear) or stored in fp16
(equal to F.linear with the rounded weight); small weights stay as they are."""

import pytest
import torch
import torch.nn.functional as F

from glmserve.layers.linear import ReplicatedLinear
from glmserve.layers.quantization import Fp16Method
from glmserve.layers.quantization.unquantized import PACKED_MAX_ROWS, PREPACK_MIN_ELEMENTS

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="no oneDNN")


def _linear(out_features: int, in_features: int, bias: bool, fp16: bool = False) -> ReplicatedLinear:
    layer = ReplicatedLinear(in_features, out_features, bias=bias, quant_method=Fp16Method() if fp16 else None)
    torch.nn.init.normal_(layer.weight, std=0.02)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("rows", [1, 5, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_large_weights_are_prepacked_and_equal_f_linear(bias, rows, monkeypatch):
    layer = _linear(PREPACK_MIN_ELEMENTS // 256, 256, bias)
    layer.process_weights_after_loading()
    assert layer.packed_weight is not None
    calls = []
    packed_op = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or packed_op(*a))
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == (rows <= PACKED_MAX_ROWS)  # bigger batches take F.linear: oneDNN's memory stays bounded


def test_small_weights_stay_unpacked():
    layer = _linear(PREPACK_MIN_ELEMENTS // 256 - 1, 256, False)
    layer.process_weights_after_loading()
    assert layer.packed_weight is None


fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm")


@fbgemm
@pytest.mark.parametrize("rows", [1, 7, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_storage_computes_with_the_rounded_weight_in_fp32(bias, rows):
    layer = _linear(PREPACK_MIN_ELEMENTS // 256, 256, bias, fp16=True)
    weight16 = layer.weight.detach().half().float()
    layer.process_weights_after_loading()
    assert layer.fp16_weight is not None and layer.weight.numel() == 0  # the fp32 copy is dropped
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, weight16, layer.bias), rtol=1e-5, atol=1e-5)


@fbgemm
def test_fp16_storage_leaves_small_weights_in_fp32():
    layer = _linear(PREPACK_MIN_ELEMENTS // 256 - 1, 256, False, fp16=True)
    layer.process_weights_after_loading()
    assert layer.fp16_weight is None and layer.weight.dtype == torch.float32 and layer.weight.numel() > 0
