"""glibc's heap policy: what it gives back to the system after loading, and what it keeps for the steps after.

Quantizing while loading allocates and frees many slice-sized temporaries; glibc keeps such freed blocks in its
heap (its mmap threshold grows to the size of freed blocks), where they count as the process's resident memory
until trimmed (measured: ~140 MiB after loading a 0.6B-parameter slice in int8).

Serving, the opposite: a prefill step's temporaries (activations, int32 GEMM sums: up to tens of MB each) were
freshly mmapped or the heap's top given back after the step, so every step faulted its pages in again and the
kernel zeroed them (perf: clear_page and page faults ~10% of a prefill step). After loading, blocks up to glibc's
largest mmap threshold come from the heap and up to STEP_HEAP_TRIM_BYTES of freed heap stay mapped for the next
step, as tcmalloc (which vLLM's CPU backend preloads) keeps them. Other C libraries keep their own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
STEP_MMAP_THRESHOLD_BYTES = 32 << 20  # the most mallopt accepts on 64-bit (HEAP_MAX_SIZE / 2)
STEP_HEAP_TRIM_BYTES = 256 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_heap() -> None:
    """glibc's malloc_trim(0)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def keep_freed_heap_for_steps() -> None:
    """From now on, blocks up to STEP_MMAP_THRESHOLD_BYTES from the heap, and freed heap kept up to
    STEP_HEAP_TRIM_BYTES (see the module's docstring)."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, STEP_HEAP_TRIM_BYTES)
