"""glibc's heap policy: what it gives back to the system after loading, and what it keeps for the steps after.

Quantizing while loading allocates and frees many slice-sized temporaries; glibc keeps such freed blocks in its
heap (its mmap threshold grows to the size of freed blocks), where they count as the process's resident memory
until trimmed (measured: ~140 MiB after loading a 0.6B-parameter slice in int8).

Serving, the opposite: a prefill step's temporaries (activations, int32 GEMM sums, the MoE's rows grouped by
expert: tens of MB each, hundreds for the real models) were freshly mmapped or the heap's top given back after the
step, so every step faulted their pages in again and the kernel zeroed them (perf: clear_page and page faults;
BENCHMARKS.md). After loading, every block comes from the heap (glibc mmaps blocks past its mmap threshold,
which cannot be raised above 32 MiB, so mmap is turned off) and up to STEP_HEAP_TRIM_BYTES of freed heap stay
mapped for the next step, as tcmalloc (which vLLM's CPU backend preloads) keeps them. A thread allocates from an
arena of its own, whose heaps hold at most 64 MiB and are trimmed by their own rules: the server's engine thread
is started after one_heap_for_every_thread, so that it allocates from the main heap this policy governs. Other C
libraries keep their own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt's parameter numbers (malloc.h)
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
    """From now on, every block from the heap, and freed heap kept up to STEP_HEAP_TRIM_BYTES (see the module's
    docstring)."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, STEP_HEAP_TRIM_BYTES)


def one_heap_for_every_thread() -> None:
    """Threads that allocate for the first time from now on share the main heap (glibc's M_ARENA_MAX 1)."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_ARENA_MAX, 1)
