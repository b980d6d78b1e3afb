"""Mediators: intervention bodies run as coroutines beside the model.

A mediator is one intervention body (one ``invoke``, the trace body itself, or an edit)
running in its own greenlet on the model's thread. It runs until it needs something from
the model (a value at a location, a place to write, a barrier) and then *parks*: it
records what it waits for and switches back to the model. The interleaver resumes it when
the model reaches that location. Nothing runs in parallel: the model and the mediators
take turns in a fixed order (visit order, then mediator order), which is what makes runs
on several ranks identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from greenlet import GreenletExit, greenlet

from .batcher import Group


@dataclass
class Wait:
    """What a parked mediator waits for.

    ``kind`` is ``"value"`` (read; ``payload`` is the request's sequence number),
    ``"remote"`` (a value from another stage; ``payload`` likewise), ``"swap"`` (write
    ``payload``), ``"skip"`` (replace a module call by ``payload``), ``"barrier"``,
    ``"sync"`` (not a park: the model's greenlet runs the wait ``payload()`` for the body
    inside the current visit) or ``"beyond"`` (a step loop past the steps the run makes:
    never served). ``iteration`` is the visit index wanted, or ``None`` for the next visit.
    """

    location: str
    iteration: Optional[int]
    kind: str
    payload: Any = None


class Mediator:
    """One intervention body and its state in the current run."""

    def __init__(self, fn: Callable[[], Any], group: Group = None, name: str = "") -> None:
        self.fn = fn
        self.group = group
        self.name = name
        self.index = 0
        self.greenlet: Optional[greenlet] = None
        self.wait: Optional[Wait] = None
        #: Visit index the body is constrained to (inside ``tracer.iter``), else ``None``.
        self.iteration: Optional[int] = None
        #: Number of value requests made so far; the n-th request is the same on every rank.
        self.seq = 0
        #: Number of times the body parked (waited on the model).
        self.parks = 0
        #: True inside a ``tracer.iter`` loop: a step the run never makes cuts the loop
        #: (see :class:`StepsExhausted`) instead of raising ``MissedProviderError``.
        self.looping = False
        #: Inside a step loop of a run with a known number of steps (``max_new_tokens``): that
        #: number. A visit index at or past it (plus a location's extra visits) never comes.
        self.bound: Optional[int] = None
        #: A one-shot eproperty transform to apply when the body next parks.
        self.transform: Optional[tuple[str, Callable[[], Any]]] = None

    @property
    def done(self) -> bool:
        return self.greenlet is not None and self.greenlet.dead

    def __repr__(self) -> str:
        return f"<mediator {self.name or self.index}>"


class StepsExhausted(GreenletExit):
    """Thrown into a mediator parked in a step loop for a step the run did not make.

    A ``GreenletExit``: when nothing catches it, the mediator's body just ends.
    ``caught`` is set by the ``with``-block form, which goes on after the block.
    """

    def __init__(self, location: str, step: int) -> None:
        super().__init__(location, step)
        self.location = location
        self.step = step
        self.caught = False

    def warning(self) -> str:
        """nnsight 0.8.1's warning for a ``for`` loop cut short, in our words."""
        return (
            f"{self.location} at iteration {self.step} was never reached: the loop asked for "
            "a step the run did not make, so it was cut short; values saved inside the loop "
            "are kept, and the statements after it did not run. An open `tracer.iter[:]` / "
            "`tracer.all()` loop ends this way by design. To hold a generation to a bounded "
            "loop's count, pass `min_new_tokens=`; put what follows the loop in a separate "
            "`tracer.invoke()`."
        )
