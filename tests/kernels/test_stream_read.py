"""The roofline's reference read: the native stream_read must read every byte of the tensor (its wrapping sum of
64-bit words says so), and measure_bandwidth must take the fastest of its read probes."""

import pytest
import torch

from glmserve.bench.roofline import measure_bandwidth
from glmserve.kernels import native

WORDS_PER_TASK = 1 << 17  # ops.cpp's kWordsPerTask


def wrapping_sum(values: list[int]) -> int:
    return (sum(values) + 2**63) % 2**64 - 2**63


@pytest.fixture
def ext():
    if native.extension() is None:
        pytest.skip("no native extension here")
    return native.extension()


@pytest.mark.parametrize("words", [1, 7, 8, 9, 100, WORDS_PER_TASK, WORDS_PER_TASK + 37, 3 * WORDS_PER_TASK + 5])
def test_stream_read_sums_every_word(ext, words):
    x = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, generator=torch.Generator().manual_seed(words))
    assert ext.stream_read(x) == wrapping_sum(x.tolist())


def test_stream_read_reads_any_dtype_as_words(ext):
    x = torch.randn(6, 10)  # 240 bytes
    assert ext.stream_read(x) == wrapping_sum(x.view(torch.int64).flatten().tolist())


def test_stream_read_refuses_part_words_and_strided_tensors(ext):
    with pytest.raises(RuntimeError, match="whole 64-bit words"):
        ext.stream_read(torch.ones(3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.stream_read(torch.ones(8, 8, dtype=torch.int64).t())


def test_measure_bandwidth_takes_the_fastest_read(ext):
    bandwidth = measure_bandwidth(torch.device("cpu"), size_bytes=2**22, reps=2)
    reads = [bandwidth[k] for k in ("sum_read_GBps", "native_read_GBps", "gemv_read_GBps")]
    assert all(r > 0 for r in reads) and bandwidth["roofline_GBps"] == max(reads)
