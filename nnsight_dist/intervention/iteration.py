"""Iteration: which visit of a location a mediator means.

When the model runs several steps (``generate``), each location is visited once per step.
By default a request means the next visit. Inside ``for step in tracer.iter[...]`` the
mediator is constrained to visit index ``step``; ``tracer.all()`` is ``iter[:]``;
``tracer.next()`` moves the mediator on to the next step.
"""

from __future__ import annotations

from typing import Iterator, Optional, Union

from .errors import NotTracingError
from .interleaver import Interleaver


class IteratorProxy:
    """``tracer.iter``: index or slice it to get the steps to loop over."""

    def __init__(self, interleaver: Interleaver, bound: Optional[int]) -> None:
        self.interleaver = interleaver
        self.bound = bound

    def __getitem__(self, key: Union[int, slice]) -> "StepLoop":
        if isinstance(key, int):
            return StepLoop(self.interleaver, range(key, key + 1), False)
        start = key.start or 0
        step = key.step or 1
        if key.stop is not None:
            return StepLoop(self.interleaver, range(start, key.stop, step), False)
        if self.bound is not None:
            # Open-ended: generation may stop before the bound (an end-of-sequence token).
            return StepLoop(self.interleaver, range(start, self.bound, step), True)
        return StepLoop(self.interleaver, _count(start, step), True)


def _count(start: int, step: int) -> Iterator[int]:
    i = start
    while True:
        yield i
        i += step


class StepLoop:
    """The steps of one ``tracer.iter[...]`` loop, setting the mediator's iteration."""

    def __init__(self, interleaver: Interleaver, steps, unbounded: bool) -> None:
        self.interleaver = interleaver
        self.steps = steps
        self.unbounded = unbounded

    def __iter__(self) -> Iterator[int]:
        med = self.interleaver.current
        if med is None:
            raise NotTracingError("tracer.iter[...] is only available inside a trace body")
        outer = med.iteration, med.unbounded
        try:
            for i in self.steps:
                med.iteration, med.unbounded = i, self.unbounded
                touched = med.seq, med.parks
                yield i
                if self.unbounded and (med.seq, med.parks) == touched:
                    break  # an open-ended loop whose body never waits on the model would spin
        finally:
            med.iteration, med.unbounded = outer


def advance(interleaver: Interleaver, step: int = 1) -> None:
    """``tracer.next(step)``: constrain the current mediator to ``step`` steps later."""
    med = interleaver.current
    if med is None:
        raise NotTracingError("tracer.next() is only available inside a trace body")
    base = med.iteration if med.iteration is not None else max(interleaver.step, 0)
    med.iteration = base + step
