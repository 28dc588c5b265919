"""A model runner that misbehaves on purpose, for tests of what the server does when the engine raises or is slow.

`glmserve serve --inject-fault-after-steps N` (hidden from --help) wraps the real runner: the first N steps run
normally, the next one raises `InjectedFault` from inside the engine step, as a CUDA error or a bug would;
`--inject-step-delay-ms MS` makes every step take at least MS longer, so a test's long request stays long on a
fast machine (a deadline or a shutdown grace period must cut it, not its own end) and its stream's chunks come
one step apart.
"""

from __future__ import annotations

import time

from glmserve.engine.model_runner import ModelRunner
from glmserve.types import SchedulerOutput, StepOutput


class InjectedFault(RuntimeError):
    pass


class FaultyRunner:
    """The real runner, each step at least `step_delay_s` slower and, after `steps_before_fault` steps (None:
    never), raising."""

    def __init__(self, runner: ModelRunner, steps_before_fault: int | None = None, step_delay_s: float = 0.0):
        self._runner = runner
        self._steps_left = steps_before_fault
        self._step_delay_s = step_delay_s

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        if self._steps_left == 0:
            raise InjectedFault("injected engine fault (--inject-fault-after-steps)")
        if self._steps_left is not None:
            self._steps_left -= 1
        time.sleep(self._step_delay_s)
        return self._runner.execute(scheduler_output)
