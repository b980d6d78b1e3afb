"""Where the model meets the interleaver: call points, sites and observers.

A *call point* is a callable whose calls are visits (a module's forward, a ``.source``
operation); each of its two locations (``<path>.input``, ``<path>.output``) has a *site*
counting the visits of the current run. *Observers* are functions called with a
location's value at every visit (caches, scans, the activation store's collection).
See :mod:`.interleaver` for how a visit is handled.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class Site:
    """Visit bookkeeping of one location within the current run."""

    __slots__ = ("location", "n", "step", "epoch", "extra")

    def __init__(self, location: str) -> None:
        self.location = location
        self.n = 0
        self.step = -1
        self.epoch = -1
        #: Visits in a run beyond one per step (a streamer also sees the prompt: 1).
        self.extra = 0


class CallPoint:
    """A callable whose calls are visits: a module's forward or a ``.source`` operation.

    An engine may attach ``before`` (``(args, kwargs) -> (args, kwargs)``, run before the
    input is handled) and ``after`` (``output -> output``, run after the output is
    handled): that is where its blocking points (receive from the previous stage, send
    to the next) live.
    """

    __slots__ = ("path", "forward", "input", "output", "root", "before", "after")

    def __init__(self, path: str, forward: Callable, input: Site, output: Site, root: bool):
        self.path = path
        self.forward = forward
        self.input = input
        self.output = output
        self.root = root
        self.before: Optional[Callable[[tuple, dict], tuple[tuple, dict]]] = None
        self.after: Optional[Callable[[Any], Any]] = None


class Observer:
    """A function called with the value of a location at every visit (caches, scans).

    ``local`` observers get this rank's fragment; the others get the whole value, which
    reaches the other stages too unless the observer is not ``routed`` (then only the
    owner's ranks are called). ``index`` names the observer across ranks (observers are
    registered in the same order on all).
    """

    __slots__ = ("fn", "local", "routed", "index")

    def __init__(self, fn: Callable[[Any, int], None], local: bool, index: int, routed: bool = True) -> None:
        self.fn = fn
        self.local = local
        self.routed = routed
        self.index = index
