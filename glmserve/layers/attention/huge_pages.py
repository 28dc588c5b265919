"""Host memory for the KV pool on transparent huge pages (2 MiB) where the kernel allows them.

A decode step reads each sequence's blocks wherever they lie in a pool of hundreds of MiB: on 4 KiB pages nearly
every block is a TLB miss, and under a hypervisor each miss walks two page tables. torch's allocator does not ask
for huge pages, and with `transparent_hugepage` set to `madvise` (a common default) it gets none; so the pool is
an anonymous mapping advised MADV_HUGEPAGE before its first touch, aligned to a huge page. BENCHMARKS.md has the
effect on the 32K decode step. GLMSERVE_KV_HUGE_PAGES=0 allocates with torch.zeros instead (to measure the
difference).

The mapping reads as zeros from the start; a thread backs it with pages afterwards (MADV_POPULATE_WRITE, which
faults pages in without writing them, so the engine may already store keys and values there). It is quick on
most hosts but can take seconds per GiB in a VM whose host has taken free memory back (BENCHMARKS.md), which a
server's first answer should not wait for. wait_until_backed() waits for it: the offline engine does, so that
its first steps do not pay the faults.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11's mmap lacks the name
_lock = threading.Lock()
_last_backing: threading.Thread | None = None
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page setting (always / madvise / never), or "" where there is none."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else ""


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) on the CPU, in memory advised for huge pages (plain torch.zeros where huge pages
    cannot be had: no MADV_HUGEPAGE, THP off, or a pool smaller than one huge page)."""
    nbytes = math.prod(shape) * dtype.itemsize
    wanted = os.environ.get("GLMSERVE_KV_HUGE_PAGES", "1") != "0"
    if not wanted or not hasattr(mmap, "MADV_HUGEPAGE") or thp_mode() in ("", "never") or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    # Private and anonymous (a shared one would be shmem, which has its own THP setting): zero-filled, not yet
    # backed by any page.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to the mapping: freed with the tensor
    offset = -raw.data_ptr() % HUGE_PAGE
    tensor = raw[offset : offset + nbytes].view(dtype).view(shape)
    _start_backing(mapping, tensor.data_ptr(), nbytes)
    return tensor


def wait_until_backed() -> None:
    """Return once every pool huge_page_zeros gave out so far is backed by memory."""
    with _lock:
        last = _last_backing
    if last is not None:
        last.join()


def _start_backing(mapping: mmap.mmap, address: int, nbytes: int) -> None:
    global _last_backing
    with _lock:
        # One pool at a time, in order: threads faulting pools in side by side slow each other and the loading.
        # The thread holds the mapping, so that the pool stays mapped until it is backed.
        _last_backing = threading.Thread(target=_back, args=(_last_backing, mapping, address, nbytes),
                                         name="kv-pool-backing", daemon=True)
        _last_backing.start()


def _back(previous: threading.Thread | None, mapping: mmap.mmap, address: int, nbytes: int) -> None:
    if previous is not None:
        previous.join()
    madvise = ctypes.CDLL(None, use_errno=True).madvise  # through ctypes: the GIL is released while it runs
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start in range(0, nbytes, HUGE_PAGE):
        if madvise(address + start, min(HUGE_PAGE, nbytes - start), _MADV_POPULATE_WRITE) != 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:  # EINVAL: a kernel before 5.14, where pages fault in at their first write
                logger.warning("could not back the KV pool with memory: %s", os.strerror(code))
            return
