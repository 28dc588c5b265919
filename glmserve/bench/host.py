"""The machine a benchmark runs on: what it is, which glmserve it runs, and how much CPU other processes take
meanwhile (on a shared machine, the difference between a measurement and noise)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path


def busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot (/proc/stat); 0 where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds used so far by these processes and all their descendants (/proc; 0 where unavailable)."""
    children: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        pid = int(stat.parent.name)
        children[int(fields[1])].append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    total, todo = 0, list(pids)
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, ())
    return total / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores other processes used from construction until `cores()`: 0 on a quiet machine. Processes doing the
    measured work elsewhere (a server, a peer's worker: `engine_pids` and their descendants) are not "other"."""

    def __init__(self, engine_pids: Iterable[int] = ()):
        self.engine_pids = list(engine_pids)
        self.busy, self.own, self.start = busy_cpu_s(), self._own(), time.perf_counter()

    def _own(self) -> float:
        return own_cpu_s() + (tree_cpu_s(self.engine_pids) if self.engine_pids else 0.0)

    def cores(self) -> float:
        other = (busy_cpu_s() - self.busy) - (self._own() - self.own)
        return max(other / (time.perf_counter() - self.start), 0.0)


def wait_quiet(max_other: float, max_wait_s: float, engine_pids: Iterable[int] = ()) -> None:
    """Sleep in 1 s windows until other processes use at most max_other cores (or max_wait_s has passed)."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        load = OtherLoad(engine_pids)
        time.sleep(1.0)
        if load.cores() <= max_other:
            return


@contextlib.contextmanager
def exclusive_lock(path: Path | None, shared: bool = False) -> Iterator[None]:
    """Hold `path`'s exclusive flock (the project's rule for benchmarks on a shared machine), or with shared=True
    its shared one (work that is not a measurement but must not disturb one: starting servers); no lock for None."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def glmserve_revision() -> dict:
    """The commit this glmserve was imported from and its locally modified files (read-only git queries)."""
    import glmserve

    root = Path(glmserve.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "glmserve"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head or None, "modified": [line[3:] for line in dirty]}


def write_results(path: Path, results: dict) -> None:
    """A benchmark's results as indented JSON at `path`, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def call_times(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
