"""The small fused kernels equal their torch references: RMSNorm (with and without the residual add), QK-norm +
partial RoPE, SiLU(gate) * up, the GLM-4.5 router's logits and top-k, argmax over the vocabulary (first maximum on
ties, NaN counting as the maximum), the rows of a quantized embedding table. These ops have one native code path for
every ISA (fused_step.cpp is compiled with the common flags), so each runs natively and on the torch fallback."""

import pytest
import torch

from glmserve import kernels
from glmserve.kernels import native
from glmserve.layers.rotary import PartialRotaryEmbedding


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


@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 77), (64, 512)])
def test_rms_norm_equals_reference(rows, hidden, path):
    gen = torch.Generator().manual_seed(hidden)
    x, weight = torch.randn(rows, hidden, generator=gen) * 2, torch.rand(hidden, generator=gen) + 0.5
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), kernels.rms_norm_reference(x, weight, 1e-5),
                               rtol=2e-6, atol=2e-6)


# (tokens, q heads, kv heads, head dim, rotary dim, QK-norm): GLM-4.5's heads of 128 with half rotated, bench shapes'
# heads of 64, a head dim that is no multiple of 8, Air (no QK-norm), and enough heads to be split over threads.
QK_CASES = [(1, 8, 2, 64, 32, True), (5, 12, 4, 128, 64, True), (3, 3, 1, 20, 10, True), (4, 6, 2, 128, 64, False),
            (64, 12, 4, 128, 64, True)]


@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim,rotary_dim,qk_norm", QK_CASES)
def test_qk_norm_rope_equals_reference(tokens, q_heads, kv_heads, head_dim, rotary_dim, qk_norm, path):
    gen = torch.Generator().manual_seed(head_dim + tokens)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    # q and k norms differ, so using one for the other fails
    q_weight, k_weight = (torch.rand(head_dim, generator=gen) + 0.5, torch.rand(head_dim, generator=gen) * 2) \
        if qk_norm else (None, None)
    rope = PartialRotaryEmbedding(head_dim, rotary_dim, 4096, 1e6).lookup(
        torch.randint(0, 4096, (tokens,), generator=gen), torch.float32)
    args = (q_weight, k_weight, q_heads, kv_heads, head_dim, rotary_dim, 1e-5)
    expected = kernels.qk_norm_rope_reference(qkv.clone(), *rope, *args)
    original_v = qkv[:, (q_heads + kv_heads) * head_dim:].clone()
    q, k, v = kernels.qk_norm_rope(qkv, *rope, *args)
    for name, got, want in zip("qkv", (q, k, v), expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(v.reshape(tokens, -1), original_v)


@pytest.mark.parametrize("rows,inter", [(1, 256), (9, 77), (32, 1408)])
def test_silu_and_mul_equals_reference(rows, inter, path):
    x = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4
    torch.testing.assert_close(kernels.silu_and_mul(x), kernels.silu_and_mul_reference(x), rtol=2e-6, atol=2e-6)


# (tokens, experts, top_k, n_group, topk_group, renormalize, scale): bench / Air routing, GLM-4.5's scale of 2.5, a
# group-limited choice (DeepSeek-V3 style), unnormalized weights, and enough tokens to be split over threads.
ROUTER_CASES = [(1, 16, 4, 1, 1, True, 1.0), (13, 128, 8, 1, 1, True, 2.5), (6, 64, 6, 8, 3, True, 1.0),
                (4, 32, 3, 4, 4, False, 1.5), (64, 128, 8, 1, 1, True, 1.0)]


@pytest.mark.parametrize("tokens,experts,top_k,n_group,topk_group,renormalize,scale", ROUTER_CASES)
def test_router_topk_equals_reference(tokens, experts, top_k, n_group, topk_group, renormalize, scale, path):
    gen = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    bias = torch.randn(experts, generator=gen)  # large enough to change the choice: it must only choose
    args = (bias, top_k, n_group, topk_group, renormalize, scale)
    weights, ids = kernels.router_topk(logits, *args)
    ref_weights, ref_ids = kernels.router_topk_reference(logits, *args)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 16, 127, 128, 300])
def test_router_logits_take_torchs_gemm_from_128_rows(rows):
    """The router's product: the native kernel below 128 rows, torch's GEMM (the same bits as F.linear) from there."""
    if native.extension() is None:
        pytest.skip("no native extension here")
    gen = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 512, generator=gen), torch.randn(16, 512, generator=gen)
    got = kernels.router_logits(x, weight)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert torch.equal(got, torch.nn.functional.linear(x, weight) if rows >= 128 else kernels.linear(x, weight))


def test_router_group_limit_changes_the_choice():
    """The group-limited case above really limits: without the limit the reference chooses other experts."""
    gen = torch.Generator().manual_seed(70)
    logits, bias = torch.randn(6, 64, generator=gen) * 2, torch.randn(64, generator=gen)
    limited = kernels.router_topk_reference(logits, bias, 6, 8, 3, True, 1.0)[1]
    assert not torch.equal(limited, kernels.router_topk_reference(logits, bias, 6, 1, 1, True, 1.0)[1])


@pytest.mark.parametrize("fmt,hidden,group_size", [("int8", 512, 512), ("int8", 70, 32), ("int4", 512, 128),
                                                   ("int4", 70, 32), ("int4", 64, 64)])
def test_embed_rows_equal_the_dequantized_table(fmt, hidden, group_size, path):
    """Each row is q times the scale of its input's group (ids of any shape, repeated ids included). The scales
    differ from group to group, so reading a neighbouring group's scale or a row's other nibble would fail."""
    gen = torch.Generator().manual_seed(hidden + group_size)
    weights = torch.randn(300, hidden, generator=gen) * torch.linspace(0.1, 4, hidden)
    quantize = kernels.quantize_int8 if fmt == "int8" else kernels.quantize_int4
    table, scales = quantize(weights, group_size)
    ids = torch.tensor([[299, 0, 7], [7, 150, 1]])
    rows = kernels.embed_rows(table, scales, group_size, ids)
    whole = kernels.dequantize(table, scales, group_size)
    assert rows.shape == (2, 3, hidden) and torch.equal(rows, whole[ids])
    if scales.shape[1] > 1:  # the test data tells groups apart
        assert not torch.equal(whole, kernels.dequantize(table, scales.roll(1, dims=1), group_size))
    if fmt == "int4":
        swapped = (table >> 4) | ((table & 0x0F) << 4)
        assert not torch.equal(whole, kernels.dequantize(swapped, scales, group_size))


def test_embed_rows_refuse_an_id_past_the_table(path):
    table, scales = kernels.quantize_int8(torch.randn(10, 16), 16)
    with pytest.raises((IndexError, RuntimeError)):
        kernels.embed_rows(table, scales, 16, torch.tensor([10]))
