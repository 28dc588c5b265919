"""The float method's routed experts on the native one-call kernel equal torch's grouped path (sorted rows or one
choice at a time), with all experts held or, under expert parallelism, a share of them (other ranks' choices add
nothing); under autograd (training, LoRA fine-tuning) the torch path runs, so gradients flow."""

import pytest
import torch

from glmserve import kernels
from glmserve.distributed import ParallelContext
from glmserve.kernels import native
from glmserve.layers.moe import FusedExperts
from glmserve.layers.quantization import UnquantizedMethod
from glmserve.layers.quantization.unquantized import NATIVE_EXPERT_MAX_TOKENS

pytestmark = pytest.mark.skipif(native.extension() is None, reason="no native extension here")


def _experts(parallel: ParallelContext, gen: torch.Generator) -> FusedExperts:
    layer = FusedExperts(12, 40, 24, parallel)
    layer.w13.copy_(torch.randn(layer.w13.shape, generator=gen) * 0.2)
    layer.w2.copy_(torch.randn(layer.w2.shape, generator=gen) * 0.2)
    layer.process_weights_after_loading()
    return layer


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    calls = []
    original = kernels.moe_experts
    monkeypatch.setattr(kernels, "moe_experts", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("tokens", [1, 2, 9, 40])
@pytest.mark.parametrize("parallel", [ParallelContext()] + [ParallelContext(tp_rank=r, tp_size=2, expert_parallel=True)
                                                             for r in (0, 1)],
                         ids=["all-experts", "expert-parallel-rank-0", "expert-parallel-rank-1"])
def test_native_experts_equal_the_grouped_torch_path(tokens, parallel, native_calls):
    gen = torch.Generator().manual_seed(tokens)
    layer = _experts(parallel, gen)
    x = torch.randn(tokens, 40, generator=gen)
    ids = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4, generator=gen)
    method = UnquantizedMethod()
    with torch.inference_mode():
        ours = method.apply_experts(layer, x, weights, ids)
        reference = layer.grouped_forward(x, weights, ids, method.expert, allow_grouped_mm=True)
    assert native_calls
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_prefills_past_the_native_bound_take_the_grouped_torch_path(native_calls):
    gen = torch.Generator().manual_seed(1)
    layer = _experts(ParallelContext(), gen)
    tokens = NATIVE_EXPERT_MAX_TOKENS + 1
    x = torch.randn(tokens, 40, generator=gen)
    ids = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4, generator=gen)
    method = UnquantizedMethod()
    with torch.inference_mode():
        ours = method.apply_experts(layer, x, weights, ids)
        reference = kernels.moe_experts_reference(x, weights, ids, layer.w13, None, layer.w2, None)
    assert not native_calls
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_under_autograd_the_experts_run_on_torch(native_calls):
    gen = torch.Generator().manual_seed(0)
    layer = _experts(ParallelContext(), gen)
    x = torch.randn(3, 40, generator=gen, requires_grad=True)
    ids = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(3)])
    out = UnquantizedMethod().apply_experts(layer, x, torch.rand(3, 4, generator=gen), ids)
    out.sum().backward()
    assert not native_calls and x.grad is not None and x.grad.abs().sum() > 0
