"""The native small-M linear equals its definition on every weight format and code path: x @ dequantize(W).T
computed in fp64, on random shapes whose K and N are multiples of no block or group size."""

import pytest
import torch
from kernel_cases import FORMATS, GROUPS, make_weight

from glmserve import kernels
from glmserve.kernels import dequantize, native, quantize_int4, quantize_int8


def activation_block(isa: str | None, weight: torch.Tensor, group_size: int) -> int:
    """Inputs per activation scale where x is quantized to int8, 0 where it stays fp32: the integer paths
    (native.INT8_ACTIVATION_ISAS) quantize x with one scale per row (block = K) against int8 / int4 weights whose
    groups line up with their vectors (csrc/ops.cpp's takes_q8: one group per row, 32, 64 for int4, multiples of
    64 / 128)."""
    if isa not in native.INT8_ACTIVATION_ISAS or weight.dtype not in (torch.int8, torch.uint8):
        return 0
    k = weight.shape[-1] * (2 if weight.dtype == torch.uint8 else 1)
    group = group_size or k
    lines_up = group >= k or group == 32 or (group == 64 or group % 128 == 0 if weight.dtype == torch.uint8
                                              else group % 64 == 0)
    return k if lines_up else 0


def activation_step(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each input's quantization step when x is quantized in blocks of `block` inputs (absmax / 127)."""
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x.double().abs(), (0, -k % block)).unflatten(-1, (-1, block)).amax(-1) / 127
    return blocks.repeat_interleave(block, -1)[..., :k]


def quantized_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x as a path that quantizes it (block = K) sees it, with each row's step: q = round(x * (127 / absmax)) in
    the kernel's fp32 arithmetic, ties to even, times absmax / 127. x itself where activations stay fp32."""
    if not block:
        return x, None
    absmax = x.abs().amax(-1, keepdim=True)
    inverse = torch.where(absmax > 0, 127 / absmax, torch.zeros_like(absmax))
    return (x * inverse).round() * (absmax / 127), absmax / 127


def expected_linear(x, weight, scales, group_size, bias, block=0):
    """fp64 x @ W.T + bias with x quantized as the kernel quantizes it (block > 0: one scale per row), and the bound
    the kernel stays within: fp32 rounding, 1e-5 of sum |x_k * w_k|, and with quantized activations one input
    rounded the other way (one step times the largest |w_k|)."""
    w = dequantize(weight, scales, group_size or x.shape[-1]).double()
    xq, step = quantized_activations(x.reshape(-1, x.shape[-1]), block)
    out = xq.double() @ w.T + (0 if bias is None else bias.double())
    bound = 1e-5 * (xq.double().abs() @ w.abs().T) + 1e-6
    if step is not None:
        bound += step.double() * w.abs().amax(-1)
    return out, bound


def assert_within(out, expected, bound):
    err = (out.double() - expected).abs()
    worst = (err - bound).argmax()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3g} over bound {bound.flatten()[worst]:.3g}"


def random_cases(seed: int, count: int):
    """(M, N, K, group_size): M spans 1..64, K is even (int4 packs two a byte) and N odd or even."""
    gen = torch.Generator().manual_seed(seed)
    ms = [1, 2, 3, 4, 5, 7, 8, 13, 16, 33, 64]
    for i in range(count):
        m = ms[(seed + i) % len(ms)]
        n = int(torch.randint(1, 70, (1,), generator=gen))
        k = 2 * int(torch.randint(1, 200, (1,), generator=gen))
        yield m, n, k, GROUPS[(seed + i) % len(GROUPS)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_equals_fp64_definition(fmt, isa):
    gen = torch.Generator().manual_seed(FORMATS.index(fmt))
    for m, n, k, group_size in random_cases(FORMATS.index(fmt), 8):
        weight, scales = make_weight(fmt, n, k, group_size, gen)
        x = torch.randn(m, k, generator=gen)
        bias = torch.randn(n, generator=gen) if m % 2 else None
        out = kernels.linear(x, weight, scales, group_size, bias, isa=isa)
        block = activation_block(isa, weight, group_size)
        assert_within(out, *expected_linear(x, weight, scales, group_size, bias, block))


@pytest.mark.parametrize("fmt", ["float32", "int8", "int4"])
def test_linear_keeps_leading_dims_and_handles_empty_batches(fmt, isa):
    gen = torch.Generator().manual_seed(7)
    weight, scales = make_weight(fmt, 20, 64, 32, gen)
    x = torch.randn(2, 3, 64, generator=gen)
    out = kernels.linear(x, weight, scales, 32, isa=isa)
    assert out.shape == (2, 3, 20)
    assert_within(out.view(6, 20), *expected_linear(x.view(6, 64), weight, scales, 32, None,
                                                    activation_block(isa, weight, 32)))
    assert kernels.linear(torch.empty(0, 64), weight, scales, 32, isa=isa).shape == (0, 20)


@pytest.mark.parametrize("fmt", ["float32", "int8", "int4"])
def test_linear_takes_strided_inputs_and_bf16_scales(fmt, isa):
    """x as a strided view, scales in bf16, bias a strided view: the op makes them contiguous fp32 itself."""
    gen = torch.Generator().manual_seed(8)
    weight, scales = make_weight(fmt, 20, 64, 32, gen)
    low = None if scales is None else scales.bfloat16()
    bias = torch.randn(40, generator=gen)[::2]
    rows, batched = torch.randn(6, 128, generator=gen), torch.randn(3, 2, 128, generator=gen)
    for x in (rows[:, ::2], batched[..., ::2].transpose(0, 1)):  # a strided view, and one reshape must copy
        out = kernels.linear(x, weight, low, 32, bias, isa=isa)
        assert out.shape == (*x.shape[:-1], 20)
        expected = expected_linear(x.reshape(-1, 64), weight, None if low is None else low.float(), 32, bias,
                                   activation_block(isa, weight, 32))
        assert_within(out.reshape(-1, 20), *expected)


@pytest.mark.parametrize("fmt,group_size", [("int4", 128), ("int8", 0)])
@pytest.mark.parametrize("rows", [1, 3])
def test_large_decode_shape(fmt, group_size, rows, isa):
    """One [rows, 4096] x [4096 -> 1408] product: many column tasks across threads; one row takes the VNNI path's
    one-weight-row-at-a-time GEMV (rows of 1 KiB and more), three rows its tiles."""
    gen = torch.Generator().manual_seed(11)
    weight, scales = make_weight(fmt, 1408, 4096, group_size, gen)
    x = torch.randn(rows, 4096, generator=gen)
    assert_within(kernels.linear(x, weight, scales, group_size, isa=isa),
                  *expected_linear(x, weight, scales, group_size, None, activation_block(isa, weight, group_size)))


@pytest.mark.parametrize("quantize,levels", [(quantize_int8, 127), (quantize_int4, 7)])
@pytest.mark.parametrize("group_size", [32, 48, 100])
def test_quantize_round_trip_is_within_half_a_step_of_its_own_group(quantize, levels, group_size):
    """Each value comes back within half its own group's step: a wrong scale index in dequantize fails this."""
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 100)
    q, scales = quantize(w, group_size)
    step = scales.repeat_interleave(group_size, 1)[:, :100]
    assert ((dequantize(q, scales, group_size) - w).abs() <= step / 2 * 1.0001 + 1e-12).all()
    assert torch.allclose(scales, (w.abs().view(5, -1)[:, :100]).new_tensor(
        [[w[r, g:g + group_size].abs().max() / levels for g in range(0, 100, group_size)] for r in range(5)]))


@pytest.mark.parametrize("fmt,group_size", [("int8", 0), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 128)])
def test_integer_products_at_the_extremes_are_exact(fmt, group_size, isa):
    """Weights at their extremes (int8 -128 / 127, int4 -8 / 7) against activations that quantize to +-127 exactly,
    signs aligned so that every product is as large as it gets (row 0: all positive, row 1: all negative): the AVX2
    path's vpmaddubsw saturates its int16 pair sums here unless it takes the sign trick. Exact up to fp32 rounding;
    K = 200 ends inside a vector and a group of 64 / 128, N = 7 inside a column tile."""
    gen = torch.Generator().manual_seed(5)
    n, k = 7, 200
    sign = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
    low, high = (-128, 127) if fmt == "int8" else (-8, 7)
    values = torch.where(sign < 0, low, high).expand(n, k)
    if fmt == "int8":
        weight = values.to(torch.int8).contiguous()
    else:
        stored = values + 8
        weight = (stored[:, 0::2] | (stored[:, 1::2] << 4)).to(torch.uint8)
    scales = torch.rand(n, -(-k // (group_size or k)), generator=gen) + 0.5
    x = torch.stack([sign, -sign, sign * (torch.randint(0, 2, (k,), generator=gen) * 2 - 1)]).float()
    w = dequantize(weight, scales, group_size or k).double()
    expected = x.double() @ w.T
    assert_within(kernels.linear(x, weight, scales, group_size, isa=isa), expected,
                  1e-5 * (x.double().abs() @ w.abs().T) + 1e-6)
