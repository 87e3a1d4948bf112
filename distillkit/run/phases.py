"""Where the time of a training step goes: a timer the loop enters around each phase of a step.

The loop names its phases (``sampling`` with ``train.generation``, ``teacher``, ``student forward``,
``objective``, ``backward``, ``optimizer``, ``bookkeeping``); the timer adds up wall-clock seconds per phase
since it was last read. On a GPU the device runs asynchronously, so a phase's time is only exact when the
timer synchronises at each boundary (``synchronize=True``, what ``distillkit bench --step`` uses); the loop's
own log leaves it off (sampling waits for the device at every new token anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

PHASES = ("sampling", "teacher", "student forward", "objective", "backward", "optimizer", "bookkeeping")
"""The phases of one optimizer step, in the order the loop runs them."""


class PhaseTimer:
    """Adds up seconds per named phase.

    Args:
        synchronize: Wait for the CUDA device at each phase boundary (exact GPU times, slower steps).

    Attributes:
        wrappers: Phase name -> a factory of a context manager entered around that phase (e.g. a profiler
            around ``objective``); empty by default.

    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self.wrappers: dict[str, Callable[[], AbstractContextManager]] = {}
        self._seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as phase ``name`` (nested phases are counted in both)."""
        wrapper = self.wrappers.get(name)
        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            if wrapper is None:
                yield
            else:
                with wrapper():
                    yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """Returns the seconds per phase since the last call, and starts counting afresh."""
        seconds, self._seconds = self._seconds, {}
        return seconds
