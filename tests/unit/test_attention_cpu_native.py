"""cpu_native (the native paged-attention kernel, every ISA path this CPU has, and its torch_blockwise fallback with
the extension off) against the float64 per-query loop and the torch_native reference: mixed batches of decode,
verification and prefill chunks (long ones in several query blocks, their diagonal key tiles masked), lengths
inside blocks and tiles, block tables out of order, prefix blocks shared, GLM-4.5's GQA shape (12 query heads per
KV head, head_dim 128) and the bench shapes', key ranges split over threads and merged, rising scores (the running
max), every KV storage dtype with its scales, and a context past 32K."""

import pytest
import torch
from test_attention_backends import BATCHES, CPU, _attend, _loop_reference, _scenario

from glmserve.kernels import native
from glmserve.layers.attention import AttentionMetadata, PagedKVCache, get_attention_backend
from glmserve.layers.attention.cpu_native import CpuNativeBackend
from glmserve.layers.attention.reference import TorchNativeBackend


@pytest.fixture(params=["torch", *native.available_isas()])
def backend(request, monkeypatch) -> CpuNativeBackend:
    """cpu_native on one ISA path; "torch": the extension off, so every call takes the torch_blockwise fallback."""
    if request.param == "torch":
        monkeypatch.setattr(native, "extension", lambda: None)
    result = CpuNativeBackend()
    result.isa = None if request.param == "torch" else request.param
    return result


def _check(backend, starts, query_lens, scale=0.3, **shape):
    cache, tables, q, k, v, keys, values = _scenario(sum(starts) + len(starts), starts, query_lens, **shape)
    got = _attend(backend, cache, tables, starts, query_lens, q, k, v, scale)
    expected = _loop_reference(q, keys, values, starts, query_lens, scale)
    assert torch.isfinite(got).all()
    # fp32 against float64: softmax of scores up to ~100 in fp32 leaves ~1e-5 relative error.
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5), (got.double() - expected).abs().max()


@pytest.mark.parametrize("starts,query_lens", BATCHES)
@pytest.mark.parametrize("magnitude", [1.0, 40.0])
def test_equals_reference_on_mixed_batches(backend, starts, query_lens, magnitude):
    _check(backend, starts, query_lens, magnitude=magnitude)


# (kv_heads, group, head_dim): GLM-4.5 and GLM-4.5-Air (96 query heads on 8 KV heads, 128 dims: 12 per KV head, here
# on 2 KV heads), bench-57m (8 on 2, 64), air-100m (12 on 2, 64), and dims that are no multiple of a vector.
SHAPES = [(2, 12, 128), (2, 4, 64), (2, 6, 64), (3, 2, 72), (1, 5, 4)]


@pytest.mark.parametrize("kv_heads,group,head_dim", SHAPES)
def test_gqa_shapes_long_contexts_split_over_threads(backend, kv_heads, group, head_dim):
    """Contexts long enough that the kernel splits each sequence's keys into several ranges (merged after), ending
    inside blocks, with a decode, a verification, a short chunk and a long chunk in one step."""
    starts, query_lens = [1700, 611, 1029, 40], [1, 5, 16, 20]
    _check(backend, starts, query_lens, 128**-0.5, block_size=16, kv_heads=kv_heads, group=group,
           head_dim=head_dim, magnitude=4.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_result_for_any_split(backend, threads):
    """The key ranges follow the thread count: every split, and no split, gives the reference's result."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(backend, [2100, 7], [1, 3], 0.2, block_size=16, kv_heads=2, group=3, head_dim=32, magnitude=8.0)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_chunks_in_query_blocks(backend, threads):
    """Chunks of 150 and 77 queries (the kernel's query blocks hold 128 rows: 32 queries of 4 heads, so 5 and 3
    blocks) starting and ending inside key tiles and blocks, one over a prefix-cache hit, beside a decode and a
    verification: each query sees exactly the keys up to its own position, the chunk's own keys included."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(backend, [45, 0, 1000, 70], [150, 77, 1, 3], 0.2, block_size=16, kv_heads=2, group=4, head_dim=24,
               share_prefix=2, magnitude=6.0)
    finally:
        torch.set_num_threads(previous)


def test_tasks_of_every_kv_head_and_of_one(backend):
    """A decode and a verification are read with every KV head in one task (whole cache rows); a chunk's query
    blocks of Air's 8 KV heads (8 x 120 rows) are too many rows for that and take one KV head a task. Both kinds in
    one step, each head's output from its own keys and values."""
    _check(backend, [300, 900, 40], [1, 3, 50], 0.2, block_size=16, kv_heads=8, group=12, head_dim=16,
           magnitude=4.0)


def test_long_chunk_split_over_keys_at_a_long_context(backend):
    """A 24-query chunk at the end of a 6,000-token context: one query block, its keys split over the threads (the
    diagonal in the last split only), against torch_native."""
    starts, query_lens = [5_977], [24]
    cache, tables, q, k, v, _, _ = _scenario(11, starts, query_lens, block_size=16, kv_heads=2, group=4,
                                             head_dim=32, magnitude=3.0)
    reference = _attend(TorchNativeBackend(), cache, tables, starts, query_lens, q, k, v, 0.3)
    got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.3)
    assert torch.allclose(got, reference, rtol=1e-4, atol=1e-5), (got - reference).abs().max()


@pytest.mark.parametrize("share_prefix", [2, 5])
def test_prefix_blocks_shared_between_sequences(backend, share_prefix):
    starts, query_lens = [share_prefix * 4 + 3, share_prefix * 4, share_prefix * 4 + 9], [1, 20, 4]
    _check(backend, starts, query_lens, share_prefix=share_prefix)


def test_rising_scores_move_the_running_max(backend):
    """Each tile of keys scores higher than the last (up to ~300: exp overflows fp32 without the running max)."""
    starts, query_lens = [200, 150], [1, 3]
    cache, tables, q, k, v, keys, values = _scenario(3, starts, query_lens, block_size=16)
    q.fill_(1.0)
    for b, table in enumerate(tables):  # key p: constant p * 0.2 in all 8 dims, so scores grow with p
        n = starts[b] + query_lens[b]
        keys[b] = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 8) * 0.2
        slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(starts[b])])
        cache.write(keys[b][: starts[b]], values[b][: starts[b]], slots)
    k = torch.cat([kb[s:] for kb, s in zip(keys, starts)])
    got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 1.0)
    expected = _loop_reference(q, keys, values, starts, query_lens, 1.0)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_gqa_maps_query_head_to_its_kv_head(backend):
    """With KV head 0's values all 0 and KV head 1's all 1, query heads 0-3 give 0 and 4-7 give 1."""
    starts, query_lens = [9, 0, 30], [1, 20, 4]
    cache, tables, q, k, v, _, _ = _scenario(1, starts, query_lens, kv_heads=2, group=4)
    cache.v[:, 0], cache.v[:, 1] = 0.0, 1.0
    v[:, 0], v[:, 1] = 0.0, 1.0
    out = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.3)
    assert torch.allclose(out[:, :4], torch.zeros(()), atol=1e-6)
    assert torch.allclose(out[:, 4:], torch.ones(()), atol=1e-6)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.2)])
def test_storage_dtypes_read_as_the_reference_reads_them(backend, storage, k_scale, v_scale):
    """The kernel widens the stored bytes as torch does and folds the scales in: the same result as torch_native
    reading the same cache, to fp32 rounding (the storage's own error is bounded in test_attention_backends)."""
    starts, query_lens = [0, 75, 130, 3], [40, 1, 4, 1]
    cache, tables, q, k, v, keys, values = _scenario(7, starts, query_lens, block_size=16, head_dim=40)
    low = PagedKVCache.allocate(cache.k.shape[0] // 16, 16, 2, 40, storage, CPU, k_scale, v_scale)
    for b, table in enumerate(tables):
        slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(starts[b])], dtype=torch.long)
        low.write(keys[b][: starts[b]], values[b][: starts[b]], slots)
    reference = _attend(TorchNativeBackend(), low, tables, starts, query_lens, q, k, v, 0.3)
    got = _attend(backend, low, tables, starts, query_lens, q, k, v, 0.3)
    assert torch.allclose(got, reference, rtol=1e-4, atol=1e-5), (got - reference).abs().max()


def test_context_past_32k(backend):
    """33,000+ keys: a decode and a verification at the far end, split over threads, against torch_native."""
    starts, query_lens = [33_001, 32_998], [1, 4]
    cache, tables, q, k, v, _, _ = _scenario(0, starts, query_lens, block_size=16, kv_heads=1, group=4,
                                             head_dim=16, magnitude=3.0)
    reference = _attend(TorchNativeBackend(), cache, tables, starts, query_lens, q, k, v, 0.5)
    got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.5)
    assert torch.allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_bf16_queries_take_the_blockwise_fallback(backend):
    starts, query_lens = [33, 4], [1, 2]
    cache, tables, q, k, v, keys, values = _scenario(5, starts, query_lens)
    got = _attend(backend, cache, tables, starts, query_lens, q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
    expected = _loop_reference(q, keys, values, starts, query_lens, 0.3)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), expected, rtol=0.05, atol=0.02)


def test_is_the_default_backend():
    assert isinstance(get_attention_backend(), CpuNativeBackend)


@pytest.mark.skipif(not native.available_isas(), reason="needs the native extension")
def test_block_id_outside_the_cache_is_an_error_not_a_read():
    starts, query_lens = [20], [1]
    cache, tables, q, k, v, _, _ = _scenario(2, starts, query_lens)
    tables[0][2] = cache.k.shape[0] // cache.block_size  # one past the last block
    meta = AttentionMetadata.build(starts, query_lens, tables, cache.block_size, CPU, CpuNativeBackend())
    with pytest.raises(RuntimeError, match="block id"):
        meta.backend.attend(q, cache, meta, 0.3)
