"""The errors a user of nnsight_dist can meet.

Every error is a subclass of :class:`NNsightError`, so ``except nd.NNsightError`` catches
anything the library raises on purpose. Messages say what happened, where (the location,
and in distributed runs the rank) and what to do about it.
"""

from __future__ import annotations


class NNsightError(Exception):
    """Base class of every error nnsight_dist raises on purpose."""


class MissedProviderError(NNsightError):
    """A mediator waited on a location that the model never reached."""


class OutOfOrderError(MissedProviderError):
    """A location was requested after its visit had already passed."""


class NotTracingError(NNsightError, ValueError):
    """A value was read or written outside of a trace (``.output`` at top level, say)."""


class TraceSetupError(NNsightError, ValueError):
    """A trace set up in a way that cannot run: no inputs at all, an invoke inside another
    invoke, or an invoke declared after the body started the model (nnsight raises
    ``ValueError`` for the first two)."""


class ModulePathError(NNsightError, AttributeError):
    """A module path that does not exist in the model tree."""


class WriteShapeError(NNsightError, ValueError):
    """A replacement value whose shape differs from the value it replaces."""


class NoGradientError(NNsightError, NotImplementedError):
    """``with t.backward():`` on a tensor that autograd does not track (nnsight 0.8.1 raises
    ``NotImplementedError``): the forward ran under ``torch.no_grad()`` (``generate``, or a
    distributed trace whose body does not call ``.backward(``), or the tensor was made
    without ``requires_grad``."""


class TracingSourceError(NNsightError):
    """The body of a ``with`` block could not be found or compiled."""


class DivergenceError(NNsightError):
    """Ranks of a replica visited or served different locations."""


class RemoteError(NNsightError):
    """Another rank failed; carries its rank and its message."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.remote_message = message


class RouterTimeout(NNsightError, TimeoutError):
    """A value never arrived from the rank expected to send it."""


class UnshardableModel(NNsightError, ValueError):
    """A tensor- or pipeline-parallel degree the model cannot be split into."""


class TopologyError(NNsightError, ValueError):
    """A request that does not fit the launched job: ``tp · pp`` not dividing the world
    size, a second ``nd.init`` with other degrees, a rank (``dst``/``src``) outside the
    world or the replica, an exchange before ``nd.init`` on a multi-rank launch."""


class UnsendableObject(NNsightError, TypeError):
    """A value ``nd.gather_object``/``nd.broadcast_object`` cannot carry: only tensors and
    JSON values (in lists, tuples and dicts) travel between ranks, nothing is pickled."""
