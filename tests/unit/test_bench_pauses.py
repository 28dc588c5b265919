"""glmserve.bench.pauses: a process stopped from outside (SIGSTOP, as yield_to_benchmarks.sh does) counts the stop
as paused; a long call that holds the GIL while computing does not."""

import os
import signal
import subprocess
import sys
import time

CHILD = """
import sys, time
from glmserve.bench.pauses import PauseMeter
meter = PauseMeter(min_gap_s=0.3)
t0 = time.perf_counter()
sum(range(60_000_000))  # one C call holding the GIL: the meter's thread cannot tick, yet the process computes
print(time.perf_counter() - t0, meter.paused_s(), flush=True)
sys.stdin.readline()  # the parent stops and resumes us meanwhile
print(meter.paused_s(), flush=True)
"""


def test_pause_meter_counts_a_stop_and_not_a_long_call():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        held_s, paused_while_computing = map(float, child.stdout.readline().split())
        assert held_s > 0.5  # long enough to be taken for a pause by a meter that looked at ticks alone
        assert paused_while_computing < 0.5
        child.send_signal(signal.SIGSTOP)
        time.sleep(2.0)
        child.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        child.stdin.write("\n")
        child.stdin.flush()
        paused = float(child.stdout.readline()) - paused_while_computing
        assert 1.5 < paused < 4.0
    finally:
        child.kill()
        child.wait()
