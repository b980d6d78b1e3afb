"""Iteration: which visit of a location a mediator means.

When the model runs several steps (``generate``), each location is visited once per step.
By default a request means the next visit. Inside ``for step in tracer.iter[...]`` the
mediator is constrained to visit index ``step``; ``tracer.all()`` is ``iter[:]``, open
ended; ``tracer.next()`` moves the mediator on to the next step.

A loop that asks for a step the run does not make (``iter[0:5]`` with 3 new tokens, or
any open-ended loop once generation ends) is *cut*, as in nnsight 0.8.1: the interleaver
throws :class:`.mediator.StepsExhausted` into the parked body when the run ends; values saved in
the reached steps are kept, the statements after the loop do not run, and a
``UserWarning`` says so. The ``with tracer.iter[...]:`` block form (deprecated in
nnsight, with a ``FutureWarning``) runs its body once per step and, when cut, goes on
with the statements after the block, silently.
"""

from __future__ import annotations

from typing import Iterator, Optional, Union

from .errors import NotTracingError
from .interleaver import Interleaver


class IteratorProxy:
    """``tracer.iter``: index or slice it to get the steps to loop over."""

    #: The loop built by indexing (the tracer's subclass also makes it a ``with`` block).
    loop: type = None  # set below, once StepLoop exists

    def __init__(self, interleaver: Interleaver, bound: Optional[int]) -> None:
        self.interleaver = interleaver
        self.bound = bound

    def __getitem__(self, key: Union[int, slice]) -> "StepLoop":
        if isinstance(key, int):
            return self.loop(self.interleaver, range(key, key + 1), False, self.bound)
        start = key.start or 0
        step = key.step or 1
        if key.stop is not None:
            return self.loop(self.interleaver, range(start, key.stop, step), False, self.bound)
        return self.loop(self.interleaver, _count(start, step), True, self.bound)


def _count(start: int, step: int) -> Iterator[int]:
    i = start
    while True:
        yield i
        i += step


class StepLoop:
    """The steps of one ``tracer.iter[...]`` loop, setting the mediator's iteration.

    Iterate it (``for step in tracer.iter[...]``); the ``with`` form is
    :class:`..tracing.tracer.StepBlock`, which runs its body through :meth:`steps`.
    """

    def __init__(self, interleaver: Interleaver, steps, unbounded: bool, bound: Optional[int]) -> None:
        self.interleaver = interleaver
        self.indices = steps
        self.unbounded = unbounded
        #: Steps the run makes at most (``max_new_tokens``), else ``None``.
        self.bound = bound

    def __iter__(self) -> Iterator[int]:
        return self.steps()

    def steps(self) -> Iterator[int]:
        """Yield each step with the current mediator constrained to it; restores the
        mediator's iteration afterwards (loops nest)."""
        med = self.interleaver.current
        if med is None:
            raise NotTracingError("tracer.iter[...] is only available inside a trace body")
        outer = med.iteration, med.looping, med.bound
        try:
            for i in self.indices:
                med.iteration, med.looping, med.bound = i, True, self.bound
                touched = med.seq, med.parks
                yield i
                if self.unbounded and (med.seq, med.parks) == touched:
                    break  # an open-ended loop whose body never waits on the model would spin
        finally:
            med.iteration, med.looping, med.bound = outer


IteratorProxy.loop = StepLoop


def advance(interleaver: Interleaver, step: int = 1) -> None:
    """``tracer.next(step)``: constrain the current mediator to ``step`` steps later."""
    med = interleaver.current
    if med is None:
        raise NotTracingError("tracer.next() is only available inside a trace body")
    base = med.iteration if med.iteration is not None else max(interleaver.step, 0)
    med.iteration = base + step
