"""Large linear weights kept for fast fp32 compute on CPU: oneDNN-prepacked (equal to F.linear) or stored in fp16
(equal to F.linear with the rounded weight); small weights stay as they are."""

import pytest
import torch
import torch.nn.functional as F

from glmserve import kernels
from glmserve.kernels import native
from glmserve.layers.linear import ReplicatedLinear
from glmserve.layers.quantization import Fp16Method
from glmserve.layers.quantization.unquantized import (
    PACKED_MAX_ROWS,
    PREPACK_MIN_ELEMENTS,
    native_linear_max_rows,
)

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="no oneDNN")


def _linear(out_features: int, in_features: int, bias: bool, fp16: bool = False) -> ReplicatedLinear:
    layer = ReplicatedLinear(in_features, out_features, bias=bias, quant_method=Fp16Method() if fp16 else None)
    torch.nn.init.normal_(layer.weight, std=0.02)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("rows", [1, native_linear_max_rows(), native_linear_max_rows() + 1, PACKED_MAX_ROWS,
                                  PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("extension", ["native", "absent"])
def test_large_weights_are_prepacked_and_equal_f_linear(extension, bias, rows, monkeypatch):
    """Decode rows up to native_linear_max_rows() (by the ISA the kernels run) run on the native kernel when it is
    built, then oneDNN's packed weight up to PACKED_MAX_ROWS, then F.linear; all equal F.linear."""
    if extension == "absent":
        monkeypatch.setattr(native, "extension", lambda: None)
    elif native.extension() is None:
        pytest.skip("no native extension here")
    layer = _linear(PREPACK_MIN_ELEMENTS // 256, 256, bias)
    layer.process_weights_after_loading()
    assert layer.packed_weight is not None
    calls = {"packed": 0, "native": 0}
    packed_op, native_op = torch.ops.mkldnn._linear_pointwise, kernels.linear
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.update(packed=calls["packed"] + 1) or packed_op(*a))
    monkeypatch.setattr(kernels, "linear",
                        lambda *a, **k: calls.update(native=calls["native"] + 1) or native_op(*a, **k))
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    on_native = extension == "native" and rows <= native_linear_max_rows()
    assert calls["native"] == on_native
    assert calls["packed"] == (not on_native and rows <= PACKED_MAX_ROWS)  # then F.linear: oneDNN's memory bounded


def test_under_autograd_linear_runs_on_torch(monkeypatch):
    layer = _linear(PREPACK_MIN_ELEMENTS // 256, 256, True)
    layer.process_weights_after_loading()
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: pytest.fail("native kernel under autograd"))
    x = torch.randn(1, 256, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


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
