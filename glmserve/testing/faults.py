"""A model runner that fails on purpose, for tests of what the server does when the engine raises.

`glmserve serve --inject-fault-after-steps N` (hidden from --help) wraps the real runner: the first N steps run
normally, the next one raises `InjectedFault` from inside the engine step, as a CUDA error or a bug would.
"""

from __future__ import annotations

from glmserve.engine.model_runner import ModelRunner
from glmserve.types import SchedulerOutput, StepOutput


class InjectedFault(RuntimeError):
    pass


class FaultyRunner:
    def __init__(self, runner: ModelRunner, steps_before_fault: int):
        self._runner = runner
        self._steps_left = steps_before_fault

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        if self._steps_left == 0:
            raise InjectedFault("injected engine fault (--inject-fault-after-steps)")
        self._steps_left -= 1
        return self._runner.execute(scheduler_output)
