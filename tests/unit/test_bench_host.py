"""A benchmark's noise meter: CPU used by the measured engine's own processes (a server and its children) is
work, not noise."""

import subprocess
import sys
import time

import pytest

from glmserve.bench.host import OtherLoad, tree_cpu_s

SPIN = "import subprocess, sys, time\n" \
       "child = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.time()\\nwhile time.time() - t < 3: pass'])\n" \
       "child.wait()\n"


def test_an_engines_process_tree_is_not_other_load():
    parent = subprocess.Popen([sys.executable, "-c", SPIN])  # the busy process is the parent's child
    try:
        time.sleep(0.5)
        before = tree_cpu_s([parent.pid])
        everything, without_engine = OtherLoad(), OtherLoad([parent.pid])
        start = time.perf_counter()
        time.sleep(1.5)
        spun = tree_cpu_s([parent.pid]) - before
        left_out = (everything.cores() - without_engine.cores()) * (time.perf_counter() - start)
        assert spun > 0.2  # the child did spin (however loaded the machine)
        assert left_out == pytest.approx(spun, abs=0.15)  # exactly its CPU time is left out of the noise
    finally:
        parent.kill()
        parent.wait()


def _can_lock(path, mode) -> bool:
    import fcntl

    with open(path, "a") as handle:  # another open file description: flock treats it as another holder
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_exclusive_lock_shared_and_exclusive(tmp_path):
    import fcntl

    from glmserve.bench.host import exclusive_lock

    lock = tmp_path / "cpu.lock"
    with exclusive_lock(lock, shared=True):  # starting servers: other readers welcome, no benchmark
        assert _can_lock(lock, fcntl.LOCK_SH)
        assert not _can_lock(lock, fcntl.LOCK_EX)
    with exclusive_lock(lock):
        assert not _can_lock(lock, fcntl.LOCK_SH)
    assert _can_lock(lock, fcntl.LOCK_EX)  # released
    with exclusive_lock(None):
        assert _can_lock(lock, fcntl.LOCK_EX)
