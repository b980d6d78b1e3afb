"""Failures: no wait without a timeout, no error without its origin.

Every distributed wait of nnsight_dist goes through :meth:`Failures.wait`: it polls the
operation, and while polling it watches the job's store for an error published by another
rank of the replica. A rank whose trace fails publishes its error (:meth:`publish`), so
the others raise :class:`RemoteError` naming the origin rank and its message instead of
waiting; a wait that outlives the timeout raises :class:`RouterTimeout` naming what was
awaited and from which rank.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

import torch.distributed as dist

from ..intervention.errors import DivergenceError, NNsightError, RemoteError, RouterTimeout
from .topology import Topology

_CHECK_EVERY = 0.02
_SHARED_KINDS = {"DivergenceError": DivergenceError, "RouterTimeout": RouterTimeout}


class Failures:
    """Error publication and guarded waits for one rank (see the module docstring)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.trace = 0
        self._store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        self._last_check = 0.0
        #: Says who was waiting for what when a wait times out (set by the replica seam).
        self.context: Optional[Callable[[], str]] = None

    def _key(self, rank: int) -> str:
        return f"nnsight_dist/error/{self.trace}/{rank}"

    def publish(self, error: BaseException) -> None:
        """Tell the replica that this rank's trace failed with ``error``."""
        if self._store is None:
            return
        payload = json.dumps({"rank": self.topo.rank, "type": type(error).__name__, "message": str(error)})
        try:
            self._store.set(self._key(self.topo.rank), payload)
        except (RuntimeError, dist.DistError):
            pass  # the store is gone (its host rank died): the others find out by themselves

    def remote(self) -> Optional[NNsightError]:
        """The error another rank of the replica published for this trace, if any.

        A divergence or a timeout seen elsewhere is raised here as the same error (naming
        the rank that saw it); anything else as :class:`RemoteError`.
        """
        if self._store is None:
            return None
        try:
            for rank in self.topo.replica_ranks():
                key = self._key(rank)
                if rank != self.topo.rank and self._store.check([key]):
                    data = json.loads(self._store.get(key).decode())
                    kind = _SHARED_KINDS.get(data["type"])
                    if kind is not None:
                        return kind(f"on rank {data['rank']}: {data['message']}")
                    return RemoteError(data["rank"], f"{data['type']}: {data['message']}")
        except (RuntimeError, dist.DistError):
            return None
        return None

    def check(self, force: bool = False) -> None:
        """Raise the error another rank published (checked at most every 20 ms)."""
        now = time.monotonic()
        if not force and now - self._last_check < _CHECK_EVERY:
            return
        self._last_check = now
        error = self.remote()
        if error is not None:
            raise error

    def wait(self, done: Callable[[], bool], what: str, source: Any, progress: Optional[Callable[[], bool]] = None,
             idle: Optional[Callable[[float], None]] = None) -> None:
        """Poll until ``done()``; ``progress()`` runs in between (True if it did something),
        and ``idle(seconds)`` (default: sleep) when there was nothing to do.

        Raises :class:`RemoteError` when another rank failed meanwhile and
        :class:`RouterTimeout` after the topology's timeout.
        """
        if done():
            return
        deadline = time.monotonic() + self.topo.timeout
        pause = 0.0
        while not done():
            if progress is not None and progress():
                pause = 0.0
                continue
            self.check()
            if time.monotonic() > deadline:
                sender = f"rank {source}" if isinstance(source, int) else str(source)
                waiting = self.context() if self.context is not None else ""
                raise RouterTimeout(
                    f"rank {self.topo.rank} waited {self.topo.timeout:g} s for {what} from {sender} "
                    f"and it never came{waiting} (raise the limit with nd.init(timeout=...) or "
                    "NNSIGHT_DIST_TIMEOUT)"
                )
            if idle is not None:
                idle(0.005)
                continue
            if pause:
                time.sleep(pause)
            pause = min(0.002, pause * 2 or 0.00005)

    def wait_work(self, work: Any, what: str, source: Any) -> None:
        """Wait for a ``torch.distributed`` async work handle (see :meth:`wait`)."""
        self.wait(lambda: lost_contact(work.is_completed, source), what, source)
        lost_contact(work.wait, source)


def lost_contact(fn: Callable[[], Any], source: Any) -> Any:
    """``fn()`` (a communication call), with a broken connection reported as a
    :class:`RemoteError` of the peer ``source`` (``-1`` when it is a group)."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        rank = source if isinstance(source, int) else -1
        raise RemoteError(rank, f"lost contact ({e}); the rank probably died") from e
