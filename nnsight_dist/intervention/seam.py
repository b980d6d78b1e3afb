"""The seam: where the interleaver meets other ranks.

The interleaver knows nothing of ranks. It asks its seam three questions, and the
defaults below answer them for one process (every location owned, every value whole):

- Is a location *remote* (computed by another pipeline stage)? Remote locations are
  listed in ``Seam.remote``; the interleaver never serves them from local visits.
- Is a location *fragmented* (tensor-parallel)? ``Seam.codecs`` maps such locations to a
  :class:`Codec` that turns the local fragment into the whole value and back.
- What happens when a value is served (``served``), when a remote value is needed
  (``fetch``; ``wait_remote`` when the body cannot go on without it: an ad-hoc call),
  and when an observed value passes (``observed``)? The distributed seam routes them
  between stages; here they do nothing.

Every value request of a mediator carries a *sequence number*: the n-th request of a
mediator is the same request on every rank (SPMD), so the pair (mediator, sequence)
names a served value across ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class Codec:
    """Turns a location's local fragment into the whole value and back (identity here)."""

    def whole(self, local: Any) -> Any:
        """The whole value from this rank's fragment (may be a collective)."""
        return local

    def fragment(self, whole: Any) -> Any:
        """This rank's fragment of ``whole``, as the engine expects it."""
        return whole


class Seam:
    """Single-process seam: nothing is remote, nothing is fragmented, nothing is routed."""

    #: Whether :meth:`served` / :meth:`observed` must be called (False: skip the calls).
    routing = False
    #: Whether an error fails the run instead of aborting the model call (see
    #: :meth:`.interleaver.Interleaver.tolerate`): ranks must finish their calls together.
    tolerant = False

    def __init__(self) -> None:
        self.remote: set[str] = set()
        self.codecs: dict[str, Codec] = {}

    def served(self, mediator: int, seq: int, location: str, value: Any) -> None:
        """An owned value was served to request ``seq`` of ``mediator``."""

    def fetch(self, mediator: int, seq: int, location: str) -> tuple[bool, Any]:
        """The remote value of request ``seq`` of ``mediator``, if it has arrived."""
        return False, None

    def check_call(self, path: str) -> None:
        """Raise if the module at ``path`` cannot be called ad hoc on this rank (in one
        process every module can)."""

    def wait_remote(self, mediator: int, seq: int, location: str) -> Any:
        """The remote value of request ``seq`` of ``mediator`` (an ad-hoc call of a module
        another rank owns), waited for; bounded, and draining arrivals while it waits.
        Nothing is remote in one process, so nothing asks here."""
        raise LookupError(f"{location} is not computed in this process and no other rank computes it")

    def observed(self, observer: int, visit: int, location: str, value: Any) -> None:
        """An owned value of ``location`` passed observer ``observer`` at visit ``visit``."""

    def inputs(self, args: tuple, kwargs: dict) -> None:
        """The batched inputs of the model call, before it starts (the distributed seam
        checks that every rank of the replica has the same)."""

    def verify(self, location: str, value: Any) -> None:
        """``value`` is about to be served as the whole value of ``location`` (check mode
        compares it across the ranks that hold it)."""

    def attribute(self, path: str, name: str, local: Callable[[], Any]) -> Any:
        """The attribute ``name`` of the module at ``path``; ``local()`` reads it here.

        Raises ``AttributeError`` when the module has no such attribute.
        """
        return local()

    def defer(self, observer: Any, visit: int, location: str, value: Any) -> bool:
        """Take over observing this fragment (to assemble it later, with others); True if taken."""
        return False

    def operations(self, path: str, names: list[str], children: dict[str, tuple[str, bool]],
                   instance: Any = None) -> None:
        """The module at ``path`` exposed the ``.source`` operations ``names``.

        ``children`` maps an operation whose value is exactly that of a call
        ``self.<attr>(...)`` of the module to ``(attr, is_call)``: the call itself
        (``is_call``: its inputs are the call's) or an assignment of that value.
        ``instance`` is the module itself when the operations are its own forward's.
        """

    def placement(self, location: str) -> str:
        """This rank's placement of ``location``'s value: ``"whole"``, ``"shard(d)"``, ``"partial"``."""
        return "whole"

    def gather_cache(self, cache: Any, placements: dict, dst: int) -> Any:
        """A sharded cache assembled whole on rank ``dst`` of the replica (here: itself)."""
        return cache

    def gradient_codec(self, tensor: Any) -> Optional[Codec]:
        """The codec of ``tensor``'s gradient in a backward block when the engine holds that
        gradient in fragments (a tensor-parallel parameter's), else ``None``: whole here."""
        return None

    def gradient(self, location: str, of: Optional[str], tensor: Any) -> bool:
        """``location`` is the gradient location of ``tensor``, a value served at ``of`` (a
        location, or ``loc[i]`` for the i-th tensor of a nest; ``None``: a tensor the body
        computed, or a parameter). True when another rank computes that gradient: the
        interleaver then hooks nothing here and asks for it like a remote value. In one
        process: False."""
        return False

    def check_plain_backward(self) -> None:
        """Raise if torch's own backward, called as a statement in a body
        (``loss.backward()``), cannot give single-device gradients on this rank (in one
        process it can)."""

    def backward(self, run: Callable[..., None]) -> None:
        """The backward pass of a ``with t.backward():`` block: ``run()`` runs autograd from
        ``t`` on this rank, its gradient visits handled as they come (see :mod:`.backward`);
        ``run(roots, grads)`` runs it from ``roots`` with gradients ``grads`` instead (a
        pipeline stage continuing a backward that began on a later stage), with the block's
        options. One process just runs ``run()``; a pipeline seam also carries gradients
        between stages."""
        run()

    def begin(self) -> None:
        """A trace starts."""

    def drain(self) -> None:
        """The model run is over: take in every value still on its way (before missed checks)."""

    def close(self) -> None:
        """The trace succeeded: agree with the other ranks that it did the same everywhere."""

    def failed(self, error: BaseException) -> None:
        """The run failed with ``error`` and goes on without interventions (tolerant seams)."""

    def fail(self, error: BaseException) -> Optional[BaseException]:
        """The trace failed with ``error`` on this rank; returns an error to raise instead."""
        return None
