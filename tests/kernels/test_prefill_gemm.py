"""The prefill path of quantized weights (layers/quantization/prefill_gemm.py: torch GEMMs from GEMM_MIN_ROWS rows)
against the torch reference and the native small-M kernel, for every scaled layout, with K and N not multiples of
the groups or the tile, and the switch between the two paths at its threshold.

Tolerance: the GEMM path rounds activations and weights to bf16 (int8 per channel: activations to int8 per row, as
the native VNNI kernel does), so results are held to 2% of the output's largest magnitude (measured: 0.4-0.8%).
Planted and caught: the short last group scaled with the first group's scale, each group with another's, the
threshold compared with > or on the wrong side.
"""

import pytest
import torch

from glmserve import kernels
from glmserve.distributed.parallel import ParallelContext
from glmserve.kernels import native
from glmserve.layers.moe import FusedExperts
from glmserve.layers.quantization import Fp8Method, Int4Method, Int8Method, prefill_gemm
from glmserve.layers.quantization.scaled import QUANTIZERS

TOLERANCE = 0.02
# (storage dtype, group size; 0 = one scale per row): every layout prefill_gemm serves, grouped ones with a short
# last group (K = 200: groups of 32 leave 8, of 128 leave 72).
LAYOUTS = {"int8-channel": (torch.int8, 0), "int8-g32": (torch.int8, 32), "int4-g128": (torch.uint8, 128),
           "int4-g32": (torch.uint8, 32), "fp8-channel": (torch.float8_e4m3fn, 0),
           "fp8-block128": (torch.float8_e4m3fn, 128)}


def _weight(layout: str, n: int, k: int, seed: int = 0):
    dtype, group = LAYOUTS[layout]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    q, scales = QUANTIZERS[dtype](w, group or k)
    return q, scales, group or k


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m,k,n", [(300, 200, 77), (130, 202, 1000)])
def test_prefill_linear_matches_reference_and_native_kernel(layout, m, k, n):
    q, scales, group = _weight(layout, n, k)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    ref = kernels.linear_reference(x, q, scales, group, bias)
    got = prefill_gemm.linear(x, q, scales, group, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert _relative_error(got, ref) <= TOLERANCE
    assert _relative_error(got, kernels.linear(x, q, scales, group, bias)) <= TOLERANCE


@pytest.mark.skipif("avx512_vnni" not in native.available_isas(), reason="the VNNI kernel's rounding is the reference")
def test_int8_per_channel_gives_the_vnni_kernels_bits():
    """Per-channel int8 through _int_mm rounds every step as the native VNNI kernel does (bias included), so a
    prompt's logits do not depend on whether its step held more or fewer rows than the threshold."""
    q, scales, group = _weight("int8-channel", 77, 200)
    x, bias = torch.randn(300, 200), torch.randn(77)
    assert torch.equal(prefill_gemm.linear(x, q, scales, group, bias),
                       kernels.linear(x, q, scales, group, bias, isa="avx512_vnni"))


@pytest.mark.parametrize("layout", ["int8-g32", "int4-g128", "fp8-channel", "fp8-block128"])
def test_tiles_cover_every_output_row(layout, monkeypatch):
    """Tiles of 3 output rows (TILE_ELEMENTS / K): 34 tiles, the last one short, each in its own columns."""
    monkeypatch.setattr(prefill_gemm, "TILE_ELEMENTS", 3 * 200)
    q, scales, group = _weight(layout, 100, 200)
    x = torch.randn(70, 200)
    assert _relative_error(prefill_gemm.linear(x, q, scales, group), kernels.linear_reference(x, q, scales, group)) \
        <= TOLERANCE


def test_widened_values_are_exact():
    """The bit-level widening to bf16 gives each stored value exactly: all 254 finite e4m3 bytes (subnormals and
    zeros included) and all 256 int4 pairs."""
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = fp8[~fp8.float().isnan()].view(1, -1)
    assert torch.equal(prefill_gemm._tile_values(finite).float() * prefill_gemm.FP8_TO_BF16_SCALE, finite.float())
    pairs = torch.arange(256, dtype=torch.uint8).view(1, -1)
    assert torch.equal(prefill_gemm._tile_values(pairs).float(), kernels.dequantize(pairs, torch.ones(1, 1), 512))


@pytest.fixture
def every_layout_fast(monkeypatch):
    """As on a CPU with VNNI and avx512_bf16, whatever this one has."""
    monkeypatch.setattr(prefill_gemm, "fast_layouts", lambda: frozenset(prefill_gemm.GEMM_MIN_ROWS))


def _apply_calls(layout: str, rows: list[int], monkeypatch) -> list[str]:
    """Which path each product of `rows` rows through a layer of this layout takes."""
    q, scales, group = _weight(layout, 40, 64)
    method = Int8Method() if q.dtype == torch.int8 else Int4Method() if q.dtype == torch.uint8 else Fp8Method()
    layer = torch.nn.Module()
    method.create_linear(layer, 40, 64)
    layer.weight.data, layer.weight.group_size = q, group
    layer.weight_scale = scales
    calls = []
    monkeypatch.setattr(prefill_gemm, "linear", lambda *a, **kw: calls.append("gemm") or torch.zeros(1))
    monkeypatch.setattr(kernels, "linear", lambda *a, **kw: calls.append("native") or torch.zeros(1))
    for count in rows:
        method.apply_linear(layer, torch.randn(1, count, 64), None)
    return calls


def _kind(layout: str) -> str:
    dtype, group = LAYOUTS[layout]
    return prefill_gemm.layout(torch.empty(0, dtype=dtype), group or 64, 64)


def _threshold(layout: str) -> int:
    return prefill_gemm.gemm_min_rows(_kind(layout))


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_switch_is_at_the_threshold(layout, tiles, monkeypatch, every_layout_fast):
    """Below the layout's threshold rows the native kernel runs, from it on the GEMM path, whatever the leading shape;
    with AMX int8 tiles the per-channel int8 threshold is GEMM_MIN_ROWS_WITH_TILES's, the others' unchanged."""
    monkeypatch.setattr(kernels.native, "int8_tiles", lambda isa=None: tiles)
    threshold = _threshold(layout)
    wanted = prefill_gemm.GEMM_MIN_ROWS_WITH_TILES if tiles else {}
    assert threshold == wanted.get(_kind(layout), prefill_gemm.GEMM_MIN_ROWS[_kind(layout)])
    assert _apply_calls(layout, [threshold - 1, threshold], monkeypatch) == ["native", "gemm"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_cpu_without_the_gemms_instructions_stays_native(layout, monkeypatch):
    """No VNNI and no avx512_bf16 / AMX (an AVX2-only CPU): torch's GEMMs run fallback code there, so every row
    count stays on the native kernels."""
    monkeypatch.setattr(prefill_gemm, "fast_layouts", lambda: frozenset())
    assert _apply_calls(layout, [_threshold(layout), 4096], monkeypatch) == ["native", "native"]


def test_fast_layouts_follow_the_cpus_instructions(monkeypatch):
    """VNNI alone serves int8 per channel (_int_mm); the bf16 tiles need avx512_bf16 or AMX."""
    for vnni, bf16, amx, expected in [(False, False, False, set()), (True, False, False, {"int8-channel"}),
                                      (False, True, False, {"int8-group", "int4", "fp8"}),
                                      (False, False, True, {"int8-group", "int4", "fp8"}),
                                      (True, True, False, set(prefill_gemm.GEMM_MIN_ROWS))]:
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        prefill_gemm.fast_layouts.cache_clear()
        assert prefill_gemm.fast_layouts() == expected
    prefill_gemm.fast_layouts.cache_clear()


def _experts(method, num_experts: int, hidden: int, intermediate: int) -> FusedExperts:
    layer = FusedExperts(num_experts, hidden, intermediate, ParallelContext(), method)
    gen = torch.Generator().manual_seed(1)
    for expert in range(num_experts):
        for name, rows, cols in (("w13", 2 * intermediate, hidden), ("w2", hidden, intermediate)):
            getattr(layer, name).load_rows(expert, 0, torch.randn(rows, cols, generator=gen) * 0.05)
    return layer


@pytest.mark.parametrize("method", [Int8Method(), Int8Method(32), Int4Method(128), Fp8Method(128)],
                         ids=["int8", "q8_0", "int4", "fp8-block128"])
def test_experts_with_many_rows_match_the_reference(method, monkeypatch, every_layout_fast):
    """Prefill-sized MoE input (the average expert over its threshold): expert 6 and 7 get no row, expert 5 a few
    (native kernel), the others over a thousand (GEMM path); against the reference and the native MoE block."""
    layer = _experts(method, 8, 96, 40)
    tokens, top_k = 4200, 2  # 1,050 choices per expert on average: over every layout's threshold
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 5, (tokens, top_k), generator=gen)
    ids[:3, 1] = 5
    weights = torch.rand(tokens, top_k, generator=gen)
    x = torch.randn(tokens, 96, generator=gen)
    assert prefill_gemm.wants_gemm(layer.w13, layer.w13.group_size, ids.numel() // 8, 96)
    args = (x, weights, ids, layer.w13, layer.w13_scale, layer.w2, layer.w2_scale, layer.w13.group_size)
    ref = kernels.moe_experts_reference(*args)
    got = method.apply_experts(layer, x, weights, ids)
    assert _relative_error(got, ref) <= TOLERANCE
    assert _relative_error(got, kernels.moe_experts(*args)) <= TOLERANCE


@pytest.mark.parametrize("m,k,n", [(300, 200, 77), (257, 1000, 129), (1, 8, 3), (0, 64, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_channel_gemm_gives_its_references_bits(isa, m, k, n, with_bias):
    """kernels.int8_channel_gemm on every path against int8_channel_gemm_reference, bit for bit: the native op only
    moves the reference's quantization of x and scaling of the int32 sums into one pass each (ISAs without integer
    kernels run the reference). K = 1000 pads the quantized rows past K; an all-zero row has no scale. Planted and
    caught: the scales' product taken as s * w_scale[c + 1], the bias added twice, the rows' q read from K instead
    of the padded stride."""
    q, scales, _ = _weight("int8-channel", n, k, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    if m:
        x[m // 2] = 0
    bias = torch.randn(n) if with_bias else None
    got = kernels.int8_channel_gemm(x, q, scales, bias, isa=isa)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.equal(got, kernels.int8_channel_gemm_reference(x, q, scales, bias))


@pytest.mark.parametrize("m,k,n", [(300, 200, 77), (257, 1000, 129), (1, 8, 3), (33, 64, 16), (64, 4096, 300),
                                   (0, 64, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_tiles_give_the_references_bits(m, k, n, with_bias):
    """int8_channel_gemm's AMX tiles (csrc/int8_gemm_amx.cpp) against int8_channel_gemm_reference, bit for bit: the
    int32 sums are exact and scaled in the same steps. Shapes with tails in every direction (rows past a block of
    32, weight rows past a block, inputs past a step of 64 and not a multiple of 4); [300, 4096] spans two slabs of
    packed weights. Planted and caught: a transpose missing its lane shuffles, the second slab's weights read from
    the first's offset, every row of a tile scaled by its first row's scale, two tiles' sums stored swapped. (The
    masks and zero padding past K and past M keep reads inside the buffers; the zero-padded activations already
    keep such bytes out of the sums, so only a crash or a sanitizer would show them dropped.)"""
    ext = native.extension()
    if ext is None or not ext.amx_int8_ready():
        pytest.skip("this CPU has no AMX int8 tiles (or its OS does not lend them)")
    q, scales, _ = _weight("int8-channel", n, k, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    if m:
        x[m // 2] = 0
    bias = torch.randn(n) if with_bias else None
    got = kernels.int8_channel_gemm(x, q, scales, bias, isa="avx512_vnni", tiles=True)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.equal(got, kernels.int8_channel_gemm_reference(x, q, scales, bias))


def test_amx_tiles_are_taken_by_default_where_they_win(monkeypatch):
    """The default path of int8_channel_gemm: the tiles where native.int8_tiles() and tiles_beat_int_mm, else
    torch's _int_mm; GLMSERVE_AMX=0 switches the tiles off."""
    ext = native.extension()
    if ext is None:
        pytest.skip("no native extension here")
    assert kernels.tiles_beat_int_mm(8, 1024) and kernels.tiles_beat_int_mm(256, 4096)
    assert not kernels.tiles_beat_int_mm(255, 4096)
    if not ext.amx_int8_ready():
        assert not native.int8_tiles("avx512_vnni")
        return
    monkeypatch.delenv("GLMSERVE_AMX", raising=False)
    assert native.int8_tiles("avx512_vnni") and not native.int8_tiles("avx2")
    monkeypatch.setenv("GLMSERVE_AMX", "0")
    assert not native.int8_tiles("avx512_vnni")
