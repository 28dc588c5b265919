"""kernels.moe_grouped_int8 (csrc/moe_grouped.cpp), a prefill chunk's routed experts with per-channel int8 weights
in one native call, against the Python loop it replaces (FusedExperts._add_expert_by_expert with
ScaledMethod.expert), bit for bit: experts above the GEMM threshold (int8_channel_gemm, on AMX tiles and on
_int_mm), one exactly at it and others below (the native kernel), one with no rows; hidden sizes that are not a
multiple of the quantizer's blocks, and one past the tiles' K limit. Every ISA path that quantizes activations.

Planted and caught: the routing weight of a row taken by its place in the run instead of its choice, a row's token
taken from its choice modulo T (not choice // k), the expert's rows quantized from the first rows of x instead of
their tokens', the native branch's down product scaled with expert 0's scales. Not visible in the bits: the
threshold's side (>= for >), since per-channel int8 gives the native kernel's bits on either path.
"""

import pytest
import torch

from glmserve import kernels
from glmserve.distributed import ParallelContext
from glmserve.kernels import native
from glmserve.layers.moe import FusedExperts
from glmserve.layers.quantization import Int8Method, prefill_gemm

THRESHOLD = 32  # native_max_rows of these tests: expert 2 has exactly this many rows, experts 5-7 fewer
TOKENS, TOP_K, EXPERTS = 80, 4, 8


def _experts(hidden: int, inter: int) -> FusedExperts:
    gen = torch.Generator().manual_seed(hidden)
    layer = FusedExperts(EXPERTS, hidden, inter, ParallelContext(), quant_method=Int8Method())
    for e in range(EXPERTS):
        layer.quant_method.load_rows(layer, "w13", e, 0, torch.randn(2 * inter, hidden, generator=gen) * 0.05)
        layer.quant_method.load_rows(layer, "w2", e, 0, torch.randn(hidden, inter, generator=gen) * 0.05)
    return layer


def _routing(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k]: experts 0 and 1 for every token, 2 for the first THRESHOLD tokens and 3 for the rest, one of 5-7
    each; expert 4 for none. Each row's choices in a random order."""
    t = torch.arange(TOKENS)
    ids = torch.stack([torch.zeros_like(t), torch.ones_like(t), torch.where(t < THRESHOLD, 2, 3), 5 + t % 3], 1)
    ids = torch.stack([row[torch.randperm(TOP_K, generator=gen)] for row in ids])
    return torch.rand(TOKENS, TOP_K, generator=gen), ids


@pytest.fixture(params=[isa for isa in native.INT8_ACTIVATION_ISAS if isa in native.available_isas()])
def int8_isa(request, monkeypatch) -> str:
    monkeypatch.setattr(native, "default_isa", lambda: request.param)  # (cached: GLMSERVE_KERNEL_ISA is read once)
    monkeypatch.setattr(prefill_gemm, "native_max_rows", lambda weight, group_size, k: THRESHOLD)
    return request.param


def _grouped(layer: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return kernels.moe_grouped_int8(x, weights, ids, layer.expert_ids.start, layer.w13, layer.w13_scale, layer.w2,
                                    layer.w2_scale, layer.w13.group_size, THRESHOLD)


def _python_loop(layer: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return layer.grouped_forward(x, weights, ids, layer.quant_method.expert, allow_grouped_mm=False)


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("hidden,inter", [(96, 40), (200, 136), (1100, 48)])
def test_one_call_gives_the_python_loops_bits(int8_isa, tiles, hidden, inter, monkeypatch):
    if tiles and not native.int8_tiles(int8_isa):
        pytest.skip(f"no AMX int8 tiles on the {int8_isa} path here")
    monkeypatch.setattr(native, "int8_tiles", lambda isa=None: tiles)
    layer = _experts(hidden, inter)
    weights, ids = _routing(torch.Generator().manual_seed(hidden + inter))
    x = torch.randn(TOKENS, hidden, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(ids.flatten(), minlength=EXPERTS).tolist() == [80, 80, THRESHOLD, 48, 0, 27, 27, 26]
    assert kernels.moe_grouped_int8_native(x, layer.w13)
    assert torch.equal(_grouped(layer, x, weights, ids), _python_loop(layer, x, weights, ids))


def test_a_rank_adds_only_its_own_experts(int8_isa):
    """Expert parallel: this rank holds the model's experts 4-11 of 16, so of the router's choices (0-7) only 4-7
    are its own, computed as its local 0-3."""
    layer = _experts(96, 40)
    layer.num_experts, layer.expert_ids = 16, range(4, 12)
    weights, ids = _routing(torch.Generator().manual_seed(5))
    x = torch.randn(TOKENS, 96)
    got = _grouped(layer, x, weights, ids)
    assert torch.equal(got, _python_loop(layer, x, weights, ids))
    layer.expert_ids = range(0, 8)  # the same weights as experts 0-7: another sum
    assert not torch.equal(got, _grouped(layer, x, weights, ids))


def test_a_prefill_takes_the_one_call(int8_isa, monkeypatch):
    """ScaledMethod.apply_experts sends a prefill's per-channel int8 experts to the native call, and its result is
    the Python loop's."""
    layer = _experts(96, 40)
    weights, ids = _routing(torch.Generator().manual_seed(3))
    x = torch.randn(TOKENS, 96)
    calls = []
    grouped = kernels.moe_grouped_int8
    monkeypatch.setattr(kernels, "moe_grouped_int8", lambda *a: calls.append(1) or grouped(*a))
    got = layer(x, weights, ids)
    assert calls == [1]
    assert torch.equal(got, _python_loop(layer, x, weights, ids))


def test_mismatched_routing_is_refused(int8_isa):
    layer = _experts(96, 40)
    weights, ids = _routing(torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="both \\[T, k\\]"):
        _grouped(layer, torch.randn(TOKENS, 96), weights[:, :3], ids)
