"""The native ops let go of the GIL, so that another Python thread (the server's event loop) runs while one of them
works: a thread looping in Python must not stall for the length of a call that takes tens of milliseconds. The
per-layer ops too (SiLU here), which take milliseconds over a prefill chunk."""

import threading
import time

import pytest
import torch

from glmserve import kernels
from glmserve.kernels import native


def _longest_stall_during(call) -> tuple[float, float]:
    """(the longest gap between two iterations of a Python loop in this thread while `call` ran in another, the
    call's seconds)."""
    done, seconds = threading.Event(), []

    def worker():
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=worker)
    last, longest = time.perf_counter(), 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return longest, seconds[0]


@pytest.fixture
def ext():
    if native.extension() is None:
        pytest.skip("no native extension here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the op, the other for the looping thread
    yield native.extension()
    torch.set_num_threads(threads)


def test_stream_read_linear_and_silu_run_without_the_gil(ext):
    big = torch.ones(2**28, dtype=torch.int64)  # 2 GiB: over 20 ms to read on one core even at 60 GB/s
    x, (w, scales) = torch.randn(256, 4096), kernels.quantize_int8(torch.randn(4096, 4096), 4096)
    rows = torch.randn(8192, 4096)  # 128 MiB in, 64 MiB out
    for call in (lambda: ext.stream_read(big), lambda: kernels.linear(x, w, scales, 4096),
                 lambda: kernels.silu_and_mul(rows)):
        stall, seconds = _longest_stall_during(call)
        # Holding the GIL, the op would stall this thread for about its whole length.
        assert seconds > 0.02 and stall < seconds / 2, (stall, seconds)
