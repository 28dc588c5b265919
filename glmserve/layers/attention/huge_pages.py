"""Host memory for the KV pool on transparent huge pages (2 MiB) where the kernel allows them.

A decode step reads each sequence's blocks wherever they lie in a pool of hundreds of MiB: on 4 KiB pages nearly
every block is a TLB miss, and under a hypervisor each miss walks two page tables. torch's allocator does not ask
for huge pages, and with `transparent_hugepage` set to `madvise` (a common default) it gets none; so the pool is
an anonymous mapping advised MADV_HUGEPAGE before its first touch, aligned to a huge page. BENCHMARKS.md has the
effect on the 32K decode step. GLMSERVE_KV_HUGE_PAGES=0 allocates with torch.zeros instead (to measure the
difference).
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
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
    tensor.zero_()  # back it now (in huge pages), as torch.zeros would, so a short pool fails at start-up
    return tensor
