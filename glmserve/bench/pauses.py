"""Time a long benchmark that may be paused from outside (the shared machine's yield_to_benchmarks.sh stops the whole
process group with SIGSTOP while someone else benchmarks): wall-clock, the time the process was stopped, and its own
CPU time, so that its figures can be given with the pauses removed."""

from __future__ import annotations

import threading
import time

from glmserve.bench.host import own_cpu_s


class PauseMeter:
    """Seconds this process spent stopped since construction. A daemon thread ticks every `tick_s`; a gap between
    ticks longer than `min_gap_s` during which the process used (almost) no CPU is a pause: a stopped process uses
    none, where a long call holding the GIL, or a machine busy with others, still uses some."""

    def __init__(self, tick_s: float = 0.05, min_gap_s: float = 0.9, max_cpu_share: float = 0.05):
        self.tick_s, self.min_gap_s, self.max_cpu_share = tick_s, min_gap_s, max_cpu_share
        self._paused_s, self._lock, self._stop = 0.0, threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="pause-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last, last_cpu = time.perf_counter(), own_cpu_s()
        while not self._stop.wait(self.tick_s):
            now, cpu = time.perf_counter(), own_cpu_s()
            gap = now - last - self.tick_s
            if gap > self.min_gap_s and cpu - last_cpu <= self.max_cpu_share * gap:
                with self._lock:
                    self._paused_s += gap
            last, last_cpu = now, cpu

    def paused_s(self) -> float:
        with self._lock:
            return self._paused_s

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Clock:
    """A reading of wall-clock, paused and CPU seconds; `since` gives the three over an interval."""

    def __init__(self, meter: PauseMeter):
        self.meter = meter
        self.wall, self.paused, self.cpu = time.perf_counter(), meter.paused_s(), own_cpu_s()

    def since(self, start: Clock) -> dict:
        wall, paused = self.wall - start.wall, self.paused - start.paused
        return {"wall_s": wall, "paused_s": paused, "active_s": wall - paused, "cpu_s": self.cpu - start.cpu}
