"""The one-call MoE block equals its definition, computed token by token in fp64: every weight format and code
path, experts that get no rows, ids < 0 (skipped), and a token that picks one expert twice."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import FORMATS, make_weight
from test_linear import activation_block, activation_step

from glmserve import kernels
from glmserve.kernels import dequantize, native


def expert_stack(fmt, experts, rows, cols, group_size, gen):
    pairs = [make_weight(fmt, rows, cols, group_size, gen) for _ in range(experts)]
    weights = torch.stack([w for w, _ in pairs])
    return weights, None if pairs[0][1] is None else torch.stack([s for _, s in pairs])


def expected_moe(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size, blocks=(0, 0)):
    """fp64, one (token, slot) at a time, and the bound the kernel stays within, carried through the block: each
    product's fp32 rounding (1e-5 of sum |w_k x_k|) and, with quantized activations, half a step of each input
    (of x, then of SiLU(gate) * up: `blocks` are each one's inputs per activation scale, 0 for fp32) times its
    weight; |SiLU'| <= 1.1 carries gate's error into SiLU(gate)."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    bound = torch.full_like(out, 1e-6)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j, e in enumerate(topk_ids[t].tolist()):
            if e < 0:
                continue
            gate_up = dequantize(w13[e], None if s13 is None else s13[e], group_size or x.shape[1]).double()
            down = dequantize(w2[e], None if s2 is None else s2[e], group_size or w13.shape[1] // 2).double()
            gate, up = (gate_up @ xt).chunk(2)
            h = F.silu(gate) * up
            weight = topk_weights[t, j].double()
            out[t] += weight * (down @ h)
            err_gate, err_up = (1e-5 * (gate_up.abs() @ xt.abs()) + quantization_error(gate_up, xt, blocks[0])
                                + 1e-6).chunk(2)
            err_h = 1.1 * err_gate * (up.abs() + err_up) + F.silu(gate).abs() * err_up + 1e-6 * h.abs()
            h_bound = h.abs() + err_h
            bound[t] += weight * (down.abs() @ err_h + 1e-5 * (down.abs() @ h_bound)
                                  + quantization_error(down, h_bound, blocks[1]))
    return out, bound


def quantization_error(w, x_abs_bound, block):
    return 0.5 * 1.001 * (w.abs() @ activation_step(x_abs_bound, block)) if block else 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens,group_size", [(1, 32), (5, 0), (16, 64), (64, 32)])
def test_moe_experts_equal_fp64_definition(fmt, tokens, group_size, isa):
    gen = torch.Generator().manual_seed(tokens + FORMATS.index(fmt))
    experts, top_k, hidden, inter = 9, 3, 70, 38
    w13, s13 = expert_stack(fmt, experts, 2 * inter, hidden, group_size, gen)
    w2, s2 = expert_stack(fmt, experts, hidden, inter, group_size, gen)
    x = torch.randn(tokens, hidden, generator=gen)
    topk_ids = torch.randint(0, experts - 2, (tokens, top_k), generator=gen)  # the last two experts get no rows
    topk_ids[0, -1] = -1  # another rank's expert
    if tokens > 1:
        topk_ids[1, 0] = topk_ids[1, 1]  # one expert twice for one token
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    out = kernels.moe_experts(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size, isa=isa)
    expected, bound = expected_moe(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size,
                                   (activation_block(isa, w13, group_size), activation_block(isa, w2, group_size)))
    err = (out.double() - expected).abs()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (err <= bound).all(), f"max error {err.max():.3g}"


def test_moe_experts_with_every_id_skipped_is_zero(isa):
    gen = torch.Generator().manual_seed(0)
    w13, _ = expert_stack("float32", 2, 8, 16, 0, gen)
    w2, _ = expert_stack("float32", 2, 16, 4, 0, gen)
    out = kernels.moe_experts(torch.randn(3, 16), torch.rand(3, 2), torch.full((3, 2), -1), w13, None, w2, None,
                              isa=isa)
    assert torch.equal(out, torch.zeros(3, 16))


def test_native_moe_rejects_an_expert_id_out_of_range():
    isa = kernels.native.default_isa()
    if isa is None:
        pytest.skip("no native extension here")
    w13, _ = expert_stack("float32", 2, 8, 16, 0, torch.Generator())
    w2, _ = expert_stack("float32", 2, 16, 4, 0, torch.Generator())
    with pytest.raises(RuntimeError, match="expert id 2 of 2 experts"):
        kernels.moe_experts(torch.randn(1, 16), torch.rand(1, 1), torch.tensor([[2]]), w13, None, w2, None, isa=isa)


def test_native_moe_rejects_scales_for_fewer_experts():
    isa = kernels.native.default_isa()
    if isa is None:
        pytest.skip("no native extension here")
    gen = torch.Generator().manual_seed(1)
    w13, s13 = expert_stack("int8", 3, 8, 64, 32, gen)
    w2, s2 = expert_stack("int8", 3, 64, 4, 0, gen)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous fp32 \[experts, rows, 2\]"):
        kernels.moe_experts(torch.randn(1, 64), torch.rand(1, 1), torch.tensor([[2]]), w13, s13[:2], w2, s2, 32,
                            isa=isa)


@pytest.mark.parametrize("isa", native.available_isas())  # a native op only: the decoder stack's
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 7])
def test_the_block_with_its_shared_expert_gives_the_bits_of_its_parts(fmt, tokens, isa):
    """moe_block (the decoder stack's MoE layer: the shared expert's products run in the routed experts' parallel
    regions) equals moe_experts plus the shared expert through linear and silu_and_mul, bit for bit; shared
    widths that are not whole tiles or tasks."""
    ext = native.extension()
    gen = torch.Generator().manual_seed(tokens + 7 * FORMATS.index(fmt))
    experts, top_k, hidden, inter, shared_inter, group_size = 9, 3, 70, 38, 42, 32
    w13, s13 = expert_stack(fmt, experts, 2 * inter, hidden, group_size, gen)
    w2, s2 = expert_stack(fmt, experts, hidden, inter, group_size, gen)
    gate_up, gate_up_scales = make_weight(fmt, 2 * shared_inter, hidden, group_size, gen)
    down, down_scales = make_weight(fmt, hidden, shared_inter, group_size, gen)
    x = torch.randn(tokens, hidden, generator=gen)
    topk_ids = torch.randint(0, experts - 2, (tokens, top_k), generator=gen)
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    index = native.isa_index(isa)
    routed = kernels.moe_experts(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size, isa=isa)
    shared = kernels.linear(kernels.silu_and_mul(kernels.linear(x, gate_up, gate_up_scales, group_size, isa=isa)),
                            down, down_scales, group_size, isa=isa)
    block = ext.moe_block(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size,
                          ext.LinearWeights(gate_up, gate_up_scales, None, group_size),
                          ext.LinearWeights(down, down_scales, None, group_size), index)
    assert torch.equal(block, routed + shared), (block - (routed + shared)).abs().max()
    if fmt == FORMATS[0] and tokens == 1:  # a shared down of the wrong width is refused, not written past the rows
        wide, wide_scales = make_weight(fmt, hidden + 1, shared_inter, group_size, gen)
        with pytest.raises(RuntimeError, match="shared down"):
            ext.moe_block(x, topk_weights, topk_ids, w13, s13, w2, s2, group_size,
                          ext.LinearWeights(gate_up, gate_up_scales, None, group_size),
                          ext.LinearWeights(wide, wide_scales, None, group_size), index)
