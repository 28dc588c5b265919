"""torch_blockwise (reads the paged cache in place, online softmax over chunks of blocks) against the torch_native
reference and a float64 per-query loop: mixed batches of decode, verification and prefill chunks, lengths that are
not multiples of the block size, prefix-cache blocks shared between sequences, block tables out of order, a
context past 32K, large scores (no overflow without the running max), FP8 storage."""

import random

import pytest
import torch

from glmserve.layers.attention import AttentionMetadata, PagedKVCache
from glmserve.layers.attention.blockwise import TorchBlockwiseBackend
from glmserve.layers.attention.reference import TorchNativeBackend

CPU = torch.device("cpu")


def _loop_reference(q, keys, values, starts, query_lens, scale):
    """Per sequence, per query, per head, in float64: softmax over keys 0..position."""
    kv_heads, group = keys[0].shape[1], q.shape[1] // keys[0].shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    row = 0
    for b, (start, n) in enumerate(zip(starts, query_lens)):
        for j in range(n):
            for h in range(q.shape[1]):
                k = keys[b][: start + j + 1, h // group].double()
                v = values[b][: start + j + 1, h // group].double()
                weights = torch.softmax(k @ q[row, h].double() * scale, dim=0)
                out[row, h] = weights @ v
            row += 1
    assert kv_heads * group == q.shape[1]
    return out


def _scenario(seed, starts, query_lens, block_size=4, kv_heads=2, group=3, head_dim=8, share_prefix=0,
              magnitude=1.0, dtype=torch.float32):
    """Caches holding every sequence's history at random (out-of-order) blocks, and this step's q, k, v.
    share_prefix: the first that many blocks of every sequence are the same block ids with the same keys (a
    prefix-cache hit); magnitude scales the queries, so scores reach magnitude * sqrt(head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [s + n for s, n in zip(starts, query_lens)]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    shared = [pool.pop() for _ in range(share_prefix)]
    tables = [shared + [pool.pop() for _ in range(n - share_prefix)] + [pool[0]] * rng.randint(0, 2)
              for n in blocks_needed]
    cache = PagedKVCache.allocate(num_blocks, block_size, kv_heads, head_dim, dtype, CPU)
    prefix_keys = torch.randn(share_prefix * block_size, kv_heads, head_dim, generator=gen)
    prefix_values = torch.randn(share_prefix * block_size, kv_heads, head_dim, generator=gen)
    keys, values = [], []
    for b, n in enumerate(seq_lens):
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        m = min(n, len(prefix_keys))
        k[:m], v[:m] = prefix_keys[:m], prefix_values[:m]
        keys.append(k)
        values.append(v)
        slots = torch.tensor([tables[b][p // block_size] * block_size + p % block_size for p in range(starts[b])],
                             dtype=torch.long)
        cache.write(k[: starts[b]], v[: starts[b]], slots)
    step_k = torch.cat([k[s:] for k, s in zip(keys, starts)])
    step_v = torch.cat([v[s:] for v, s in zip(values, starts)])
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=gen) * magnitude
    return cache, tables, q, step_k, step_v, keys, values


def _attend(backend, cache, tables, starts, query_lens, q, k, v, scale):
    cache = PagedKVCache(cache.k.clone(), cache.v.clone(), cache.block_size, cache.k_scale, cache.v_scale)
    assert (cache.table is not None) == (cache.k.dtype.itemsize == 1)
    meta = AttentionMetadata.build(starts, query_lens, tables, cache.block_size, CPU, backend)
    return backend.forward(q, k, v, cache, meta, scale)


def _blockwise(chunk_tokens: int, flash: bool = True) -> TorchBlockwiseBackend:
    backend = TorchBlockwiseBackend()
    backend.CHUNK_TOKENS = chunk_tokens  # this instance only
    backend.use_cpu_flash = flash
    return backend


# Decode (1), verification (2-5) and prefill chunks (short path up to 16 queries, long path beyond), with starts and
# ends inside blocks; a sequence alone; all decodes of different lengths.
BATCHES = [
    ([0, 5, 17, 3, 30, 9], [40, 1, 4, 1, 12, 2]),
    ([13], [1]),
    ([0], [23]),
    ([7, 33, 0, 21], [1, 1, 1, 1]),
    ([4, 4, 4], [3, 3, 3]),
    ([31, 2], [17, 30]),
]


@pytest.mark.parametrize("starts,query_lens", BATCHES)
@pytest.mark.parametrize("chunk_tokens,flash", [(8, True), (8, False), (4096, True)])
@pytest.mark.parametrize("magnitude", [1.0, 40.0])
def test_blockwise_equals_reference(starts, query_lens, chunk_tokens, flash, magnitude):
    seed = sum(starts) + len(query_lens)
    cache, tables, q, k, v, keys, values = _scenario(seed, starts, query_lens, magnitude=magnitude)
    scale = 8**-0.5
    expected = _loop_reference(q, keys, values, starts, query_lens, scale)
    native = _attend(TorchNativeBackend(), cache, tables, starts, query_lens, q, k, v, scale)
    blockwise = _attend(_blockwise(chunk_tokens, flash), cache, tables, starts, query_lens, q, k, v, scale)
    assert torch.isfinite(blockwise).all()
    # fp32 against float64: softmax of scores up to ~100 in fp32 leaves ~1e-5 relative error.
    assert torch.allclose(native.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(blockwise.double(), expected, rtol=1e-4, atol=1e-5)


def test_rising_scores_across_chunks():
    """Each chunk's keys score higher than the last, so every chunk moves the running max: the accumulator
    must be rescaled each time (and one chunk of scores ~200 overflows exp() without subtracting the max)."""
    starts, query_lens = [60, 45], [1, 3]
    cache, tables, q, k, v, keys, values = _scenario(3, starts, query_lens)
    q.fill_(1.0)
    for b, table in enumerate(tables):  # key p of every sequence: constant p * 0.5, so scores grow with p
        n = starts[b] + query_lens[b]
        keys[b] = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 8) * 0.5
        slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(starts[b])])
        cache.write(keys[b][: starts[b]], values[b][: starts[b]], slots)
    k = torch.cat([kb[s:] for kb, s in zip(keys, starts)])
    expected = _loop_reference(q, keys, values, starts, query_lens, 1.0)
    for backend in (_blockwise(8), _blockwise(8, flash=False)):
        got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 1.0)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("share_prefix", [2, 5])
def test_prefix_blocks_shared_between_sequences(share_prefix):
    """Sequences whose first blocks are the same block ids (a prefix-cache hit), one of them still prefilling past
    the shared part, one decoding, one verifying."""
    starts, query_lens = [share_prefix * 4 + 3, share_prefix * 4, share_prefix * 4 + 9], [1, 20, 4]
    cache, tables, q, k, v, keys, values = _scenario(share_prefix, starts, query_lens, share_prefix=share_prefix)
    assert all(t[:share_prefix] == tables[0][:share_prefix] for t in tables)
    expected = _loop_reference(q, keys, values, starts, query_lens, 0.3)
    for backend in (TorchNativeBackend(), _blockwise(8), _blockwise(8, flash=False)):
        got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.3)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5), backend


def test_context_past_32k():
    """33,000+ keys on one KV head of 4 dims: a decode, a verification and a prefill chunk at the far end, the
    default chunk size (several chunks per sequence), compared with the reference."""
    starts, query_lens = [33_001, 32_998, 32_950], [1, 4, 30]
    cache, tables, q, k, v, _, _ = _scenario(0, starts, query_lens, block_size=16, kv_heads=1, group=2,
                                             head_dim=4, magnitude=3.0)
    native = _attend(TorchNativeBackend(), cache, tables, starts, query_lens, q, k, v, 0.5)
    for backend in (TorchBlockwiseBackend(), _blockwise(4096, flash=False)):
        got = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.5)
        assert torch.allclose(got, native, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.2)])
def test_low_precision_storage_dequantized_alike(storage, k_scale, v_scale):
    """Both backends read the same stored bytes the same way (to fp32 rounding), and land near the fp32 cache:
    within the format's rounding (e4m3: 3 mantissa bits, ~6% per value; e5m2: 2 bits; bf16: 7 bits)."""
    starts, query_lens = [0, 5, 17, 3], [40, 1, 4, 1]
    cache, tables, q, k, v, keys, values = _scenario(7, starts, query_lens)
    exact = _attend(TorchNativeBackend(), cache, tables, starts, query_lens, q, k, v, 0.3)
    low = PagedKVCache.allocate(cache.k.shape[0] // 4, 4, 2, 8, storage, CPU, k_scale, v_scale)
    for b, table in enumerate(tables):
        slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(starts[b])], dtype=torch.long)
        low.write(keys[b][: starts[b]], values[b][: starts[b]], slots)
    native = _attend(TorchNativeBackend(), low, tables, starts, query_lens, q, k, v, 0.3)
    blockwise = _attend(_blockwise(8), low, tables, starts, query_lens, q, k, v, 0.3)
    assert torch.allclose(blockwise, native, rtol=1e-5, atol=1e-5)
    bound = {torch.float8_e4m3fn: 0.25, torch.float8_e5m2: 0.5, torch.bfloat16: 0.03}[storage]
    assert 0 < (native - exact).abs().max().item() <= bound


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_table_lookup_equals_the_cast(storage):
    cache = PagedKVCache.allocate(1, 256, 1, 1, storage, CPU)
    cache.k.view(torch.uint8).copy_(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(256, 1, 1))
    assert torch.allclose(cache.dequantize(cache.k, torch.float32), cache.k.float(), equal_nan=True)
    assert torch.allclose(cache.dequantize(cache.k[::3], torch.bfloat16), cache.k[::3].to(torch.bfloat16),
                          equal_nan=True)


def test_fp8_store_saturates_instead_of_nan():
    cache = PagedKVCache.allocate(1, 4, 1, 2, torch.float8_e4m3fn, CPU, k_scale=0.5, v_scale=1.0)
    cache.write(torch.tensor([[[1000.0, -3.0]]]), torch.tensor([[[1e6, 0.25]]]), torch.tensor([0]))
    assert cache.k[0].float().tolist() == [[448.0, -6.0]]  # 1000 / 0.5 saturates at e4m3's 448
    assert cache.v[0].float().tolist() == [[448.0, 0.25]]


def test_gqa_maps_query_head_to_its_kv_head():
    """Query head h reads KV head h // group: with one KV head all zeros and one all ones (values), every query
    head's output is its KV head's constant."""
    starts, query_lens = [9, 0], [1, 20]
    cache, tables, q, k, v, _, _ = _scenario(1, starts, query_lens, kv_heads=2, group=4)
    cache.v[:, 0], cache.v[:, 1] = 0.0, 1.0
    v[:, 0], v[:, 1] = 0.0, 1.0
    for backend in (_blockwise(8), _blockwise(8, flash=False)):
        out = _attend(backend, cache, tables, starts, query_lens, q, k, v, 0.3)
        assert torch.allclose(out[:, :4], torch.zeros(()), atol=1e-6)
        assert torch.allclose(out[:, 4:], torch.ones(()), atol=1e-6)


def test_reads_no_more_than_a_chunk_at_once(monkeypatch):
    """The blockwise backend copies at most CHUNK_TOKENS keys per sequence out of the cache at once (a prefill
    chunk's own keys: its length, plus the block it starts in), never a whole 200-token context."""
    from glmserve.layers.attention import blockwise

    largest = []
    read = blockwise._read

    def spy(cache, blocks, ids, batch, num_tokens, dtype):
        largest.append(ids.numel() * blocks.shape[1] // batch)
        return read(cache, blocks, ids, batch, num_tokens, dtype)

    monkeypatch.setattr(blockwise, "_read", spy)
    starts, query_lens = [200, 190, 100], [1, 4, 30]
    cache, tables, q, k, v, _, _ = _scenario(2, starts, query_lens)
    _attend(_blockwise(32), cache, tables, starts, query_lens, q, k, v, 0.3)
    assert len(largest) > 6 and max(largest) <= 32 + 4  # the prefill's own keys may start mid-block


def test_calculated_scales_come_from_the_first_write_only():
    cache = PagedKVCache.allocate(2, 4, 1, 2, torch.float8_e4m3fn, CPU, calculate_scales=True)
    cache.write(torch.tensor([[[50.0, -400.0]]]), torch.tensor([[[3.0, 0.5]]]), torch.tensor([0]))
    assert (cache.k_scale, cache.v_scale) == (2.0, 0.03)  # |K|max / 200, |V|max / 100, as vLLM
    assert cache.k[0].float().tolist() == [[24.0, -192.0]]  # e4m3 rounds 25 to 24, and 200 (a tie) to 192
    cache.write(torch.tensor([[[1000.0, 0.0]]]), torch.tensor([[[9.0, 0.0]]]), torch.tensor([1]))
    assert (cache.k_scale, cache.v_scale) == (2.0, 0.03)
