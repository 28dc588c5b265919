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
