"""The small fused kernels equal their torch references: RMSNorm with the residual add, argmax over the vocabulary
(first maximum on ties, NaN counting as the maximum)."""

import pytest
import torch

from glmserve import kernels
from glmserve.kernels import native


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """These kernels have one code path for every ISA: the native one, and the torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(native, "extension", lambda: None)
    elif native.extension() is None:
        pytest.skip("no native extension here")


@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 77), (64, 512)])
def test_rms_norm_residual_equals_reference(rows, hidden, path):
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, hidden, generator=gen), torch.randn(rows, hidden, generator=gen) * 3
    weight = torch.rand(hidden, generator=gen) + 0.5
    out, summed = kernels.rms_norm_residual(x, residual, weight, 1e-5)
    ref_out, ref_sum = kernels.rms_norm_residual_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_sum)  # one fp32 add each: exact
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)  # sum of squares in another order


@pytest.mark.parametrize("rows,vocab", [(1, 151552), (5, 1000), (16, 33)])
def test_argmax_equals_torch_including_ties_and_nan(rows, vocab, path):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[0, vocab // 3] = logits[0, -1] = 100.0  # a tie: the first wins
    if rows > 1:
        logits[1, vocab // 2] = float("nan")
        logits[1, -1] = float("nan")
    if rows > 2:
        logits[2] = float("-inf")
    assert torch.equal(kernels.argmax(logits), kernels.argmax_reference(logits))
    assert kernels.argmax(logits)[0] == vocab // 3
