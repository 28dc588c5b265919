"""glibc's heap policy for the steps (glmserve/loader/heap.py): a step's large temporaries come from the heap and
stay there for the next step, in the engine thread too. Each case runs in a fresh interpreter: the policy is the
whole process's."""

import subprocess
import sys
import textwrap

import pytest

from glmserve.loader.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"),
                                reason="needs glibc 2.33 or later")

PROBE = """
import ctypes, os, tempfile, threading
import torch
from glmserve.loader.heap import _glibc, keep_freed_heap_for_steps, one_heap_for_every_thread

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _glibc()
libc.mallinfo2.restype = MallInfo2
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)

def mmapped_bytes():
    return libc.mallinfo2().hblkhd

def arenas():
    with tempfile.TemporaryFile() as f:  # malloc_info writes one <heap> element per arena
        stream = libc.fdopen(os.dup(f.fileno()), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        return f.read().count(b"<heap nr=")

def step():  # a prefill step's temporaries: one past glibc's largest mmap threshold, and smaller ones
    before = mmapped_bytes()
    blocks = [torch.empty(96 << 20, dtype=torch.uint8), torch.empty(8 << 20, dtype=torch.uint8)]
    mmapped = mmapped_bytes() - before
    del blocks
    return mmapped

POLICY
print(step(), end=" ")
thread_result = []
thread = threading.Thread(target=lambda: thread_result.append(step()))
thread.start(); thread.join()
print(thread_result[0], arenas())
"""


def run_probe(policy: str) -> tuple[int, int, int]:
    code = textwrap.dedent(PROBE).replace("POLICY", policy)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    main_mmapped, thread_mmapped, arenas = map(int, done.stdout.split())
    return main_mmapped, thread_mmapped, arenas


def test_the_steps_temporaries_come_from_the_one_heap():
    main_mmapped, thread_mmapped, arenas = run_probe("keep_freed_heap_for_steps(); one_heap_for_every_thread()")
    assert main_mmapped == thread_mmapped == 0  # from the heap, where the freed blocks stay for the next step
    assert arenas == 1  # the thread allocated from the main heap, which the policy governs


def test_the_probe_sees_glibcs_own_policy():
    """Without the policy, the large block is mmapped, and a thread allocates from an arena of its own: the probe
    can tell."""
    main_mmapped, thread_mmapped, arenas = run_probe("")
    assert main_mmapped >= 96 << 20 and thread_mmapped >= 96 << 20
    assert arenas >= 2
