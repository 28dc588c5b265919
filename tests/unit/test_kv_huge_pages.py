"""The CPU KV pool on transparent huge pages (layers/attention/huge_pages.py)."""

import re

import pytest
import torch

from glmserve.layers.attention import PagedKVCache
from glmserve.layers.attention.huge_pages import HUGE_PAGE, huge_page_zeros, thp_mode, wait_until_backed

CPU = torch.device("cpu")


def huge_kib_of(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds tensor's memory (/proc/self/smaps)."""
    address, mapping = tensor.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                mapping = int(span[1], 16) <= address < int(span[2], 16)
            elif mapping and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_huge_page_zeros_is_torch_zeros(dtype):
    pool = huge_page_zeros((3 * HUGE_PAGE // 256, 2, 64), dtype)
    assert pool.shape == (3 * HUGE_PAGE // 256, 2, 64) and pool.dtype == dtype and pool.is_contiguous()
    assert not pool.view(torch.uint8).any()
    pool.view(torch.uint8)[-1, -1, -1] = 7  # its memory is its own, to the last byte
    small = huge_page_zeros((4, 2, 8), dtype)  # under one huge page: plain torch.zeros
    assert small.shape == (4, 2, 8) and not small.view(torch.uint8).any()


def test_the_cpu_kv_pool_lies_on_huge_pages():
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode() or 'absent'} here")
    cache = PagedKVCache.allocate(2048, 16, 2, 64, torch.float32, CPU)  # 16 MiB each for K and V
    assert cache.k.data_ptr() % HUGE_PAGE == 0
    wait_until_backed()
    for pool in (cache.k, cache.v):
        # The kernel may fall back to small pages when it finds no free huge page: most of the pool suffices.
        assert huge_kib_of(pool) * 1024 >= pool.numel() * pool.element_size() // 2


def test_what_is_written_while_the_pool_is_backed_stays():
    """The pool is backed by a thread after huge_page_zeros returns; the engine may write KV meanwhile."""
    pools = [huge_page_zeros((32 * HUGE_PAGE // 4,), torch.float32) for _ in range(3)]  # 64 MiB each
    for number, pool in enumerate(pools, 1):  # the last pages first: the thread backs each pool from its start
        pool[-HUGE_PAGE:] = number
        pool[:16] = -number
    wait_until_backed()
    for number, pool in enumerate(pools, 1):
        assert (pool[-HUGE_PAGE:] == number).all() and (pool[:16] == -number).all()
        assert not pool[16:-HUGE_PAGE].any()
    if thp_mode() in ("always", "madvise"):  # and backed it is, in huge pages
        assert all(huge_kib_of(pool) * 1024 >= pool.numel() * 4 // 2 for pool in pools)


def test_glmserve_kv_huge_pages_0_allocates_with_torch(monkeypatch):
    if thp_mode() != "madvise":
        pytest.skip("only where torch's own allocations get no huge pages")
    monkeypatch.setenv("GLMSERVE_KV_HUGE_PAGES", "0")
    cache = PagedKVCache.allocate(2048, 16, 2, 64, torch.float32, CPU)
    assert huge_kib_of(cache.k) == 0 and not cache.k.any()
