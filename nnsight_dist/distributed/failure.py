"""Failures: no wait without a timeout, no error without its origin.

Every distributed wait of nnsight_dist goes through :meth:`Failures.wait`: it polls the
operation, and while polling it watches the job's store for an error published by another
rank of the replica. A rank whose trace fails publishes its error (:meth:`publish`), so
the others raise :class:`RemoteError` naming the origin rank and its message instead of
waiting; a wait that outlives the timeout raises :class:`RouterTimeout` naming what was
awaited and from which rank. A rank that finds a peer dead (or a process group broken)
marks the whole job lost (:meth:`mark_lost`): every wait of every rank then ends at once.

It also keeps this trace's *ledger*: every collective nnsight_dist issues during a trace
(:meth:`all_gather`, :meth:`all_reduce`) is recorded with its group, kind, dtype and shape.
When a trace fails, ranks of a group may have issued different numbers of them (a rank
waiting in an all-gather that a failed rank never joined); :meth:`reconcile` issues the
missing ones with zeros, so the group's collectives match again for the next trace.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..intervention.errors import DivergenceError, NNsightError, RemoteError, RouterTimeout
from .topology import Topology

_CHECK_EVERY = 0.02
#: Set once a rank of the job is lost (died, or a process group broke): for good.
_LOST = "nnsight_dist/lost"
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
        #: This rank's own failure in the current trace: waits end at once (see :meth:`wait`).
        self.failed: Optional[BaseException] = None
        self.published = False
        self._written: list[tuple[int, str]] = []
        #: Collectives issued in the current trace: group name -> [[kind, dtype, shape], ...].
        self.ledger: dict[str, list] = {}
        self._names = {id(g): name for name, g in topo._groups.items()}
        #: The ranks whose errors end this rank's trace: the replica's, or this stage's
        #: tensor-parallel group in a stage-local trace (see :mod:`.replica`).
        self.scope: Optional[list[int]] = None

    def begin(self, trace: int) -> None:
        """Start trace number ``trace``: no failure, an empty ledger; the store keys this
        rank wrote two traces ago are deleted (every rank has read them: it passed the end
        of the trace after, or failed it, and so finished the one before)."""
        self.trace = trace
        self.failed = None
        self.published = False
        self.ledger = {}
        old = [key for t, key in self._written if t <= trace - 2]
        self._written = [(t, key) for t, key in self._written if t > trace - 2]
        try:
            for key in old:
                self._store.delete_key(key)
        except (RuntimeError, dist.DistError):
            pass  # the store is gone: the next wait says so

    def set(self, what: str, value: str) -> None:
        """Write ``value`` under this trace's and rank's key ``what`` in the store
        (``nnsight_dist/<what>/<trace>/<rank>``, deleted two traces later)."""
        key = f"nnsight_dist/{what}/{self.trace}/{self.topo.rank}"
        self._store.set(key, value)
        self._written.append((self.trace, key))

    def _key(self, rank: int) -> str:
        return f"nnsight_dist/error/{self.trace}/{rank}"

    def publish(self, error: BaseException) -> None:
        """Tell the replica that this rank's trace failed with ``error`` (once per trace;
        not an error that came from another rank)."""
        if self._store is None or self.published or isinstance(error, RemoteError) \
                or getattr(error, "origin", None) is not None:
            return
        self.published = True
        payload = json.dumps({"rank": self.topo.rank, "type": type(error).__name__, "message": str(error)})
        try:
            self.set("error", payload)
        except (RuntimeError, dist.DistError):
            pass  # the store is gone (its host rank died): the others find out by themselves

    def mark_lost(self, rank: int, message: str) -> None:
        """Tell the job that rank ``rank`` (``-1``: unknown) is lost: every wait of every
        rank then raises a :class:`RemoteError` whose ``lost`` is True, now and later."""
        try:
            if self._store is not None:
                self._store.set(_LOST, json.dumps({"rank": rank, "message": message}))
        except (RuntimeError, dist.DistError):
            pass  # the store is gone with its host: the others find out by themselves

    def remote(self) -> Optional[NNsightError]:
        """The error another rank of the replica published for this trace, if any, or the
        loss of a rank of the job (:meth:`mark_lost`), first.

        A divergence or a timeout seen elsewhere is raised here as the same error (naming
        the rank that saw it); anything else as :class:`RemoteError`.
        """
        if self._store is None:
            return None
        try:
            if self._store.check([_LOST]):
                data = json.loads(self._store.get(_LOST).decode())
                error = RemoteError(data["rank"], f"{data['message']}; the job cannot trace any more: restart it")
                error.lost = True
                return error
            for rank in self.scope or self.topo.replica_ranks():
                key = self._key(rank)
                if rank != self.topo.rank and self._store.check([key]):
                    data = json.loads(self._store.get(key).decode())
                    kind = _SHARED_KINDS.get(data["type"])
                    if kind is not None:
                        error = kind(f"on rank {data['rank']}: {data['message']}")
                        error.origin = data["rank"]
                        return error
                    return RemoteError(data["rank"], f"{data['type']}: {data['message']}")
        except (RuntimeError, dist.DistError):
            return None
        return None

    def check(self, force: bool = False, lost_only: bool = False) -> None:
        """Raise the error another rank published (checked at most every 20 ms); with
        ``lost_only``, only the loss of a rank."""
        now = time.monotonic()
        if not force and now - self._last_check < _CHECK_EVERY:
            return
        self._last_check = now
        error = self.remote()
        if error is not None and (not lost_only or getattr(error, "lost", False)):
            raise error

    def wait(self, done: Callable[[], bool], what: str, source: Any, progress: Optional[Callable[[], bool]] = None,
             idle: Optional[Callable[[float], None]] = None, engine: bool = False) -> None:
        """Poll until ``done()``; ``progress()`` runs in between (True if it did something),
        and ``idle(seconds)`` (default: sleep) when there was nothing to do.

        Raises :class:`RemoteError` when another rank failed meanwhile, this rank's own
        failure (:attr:`failed`) when it failed meanwhile, and :class:`RouterTimeout` after
        the topology's timeout. An ``engine`` wait (the engine's stage-to-stage transfers)
        ends only with its message, the timeout or a lost rank: every rank runs its model
        call to the end, also after a failure, so the message comes, and ranks of a
        tensor-parallel group must compute on the same messages to keep the engine's
        collectives matched.
        """
        if done():
            return
        start = time.monotonic()
        deadline = start + self.topo.timeout
        # A store round trip costs about as much as a short wait: the store is read once the
        # wait has lasted _CHECK_EVERY (a wait that ends sooner needed nobody's error).
        self._last_check = max(self._last_check, start)
        pause = 0.0
        while not done():
            if progress is not None and progress():
                pause = 0.0
                continue
            if not engine:
                if self.failed is not None:
                    raise self.failed
                self.check()
            else:
                self.check(lost_only=True)
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

    def wait_work(self, work: Any, what: str, source: Any, engine: bool = False) -> None:
        """Wait for a collective's async work handle (see :meth:`wait`), blocked in it between
        the checks (so its end is seen at once)."""
        def idle(seconds: float) -> None:
            try:
                work.wait(timedelta(seconds=seconds))
            except (RuntimeError, dist.DistError):
                pass  # the slice ended (a collective's timed wait leaves it posted), or it failed: see below

        self.wait(lambda: lost_contact(work.is_completed, source), what, source, idle=idle, engine=engine)
        lost_contact(work.wait, source)

    # ------------------------------------------------------------------ collectives

    def _record(self, group: Any, kind: str, t: torch.Tensor) -> None:
        name = self._names.get(id(group), "?")
        self.ledger.setdefault(name, []).append([kind, str(t.dtype), list(t.shape)])

    def all_gather(self, parts: list, t: torch.Tensor, group: Any, what: str, source: Any,
                   engine: bool = False) -> None:
        """``dist.all_gather(parts, t)`` over ``group``, recorded and guarded (see :meth:`wait`;
        ``engine``: one that every rank issues also after a failure, such as a backward
        pass's, which runs to its end)."""
        self._record(group, "all_gather", t)
        self.wait_work(dist.all_gather(parts, t, group=group, async_op=True), what, source, engine)

    def all_reduce(self, t: torch.Tensor, group: Any, what: str, source: Any) -> None:
        """``dist.all_reduce(t)`` (a sum, in place) over ``group``, recorded and guarded."""
        self._record(group, "all_reduce", t)
        self.wait_work(dist.all_reduce(t, group=group, async_op=True), what, source)

    def members(self, name: str) -> list[int]:
        """Global ranks of this rank's group ``name`` (``"tp"`` or ``"replica"``)."""
        topo = self.topo
        if name == "tp":
            return [topo.rank_of(topo.pp_rank, t) for t in range(topo.tp)]
        return topo.replica_ranks()

    def reconcile(self, ledgers: dict[int, dict]) -> None:
        """Bring this rank's groups to the longest of their members' ``ledgers`` (rank ->
        ledger of this trace): the collectives this rank did not issue are issued with zeros,
        in order, so that every member's pending ones complete and the next trace's line up.

        Up to a failure the ranks of a group issue the same collectives (SPMD), so what a
        rank misses is the suffix the others issued after it stopped intervening.
        """
        for name in ("tp", "replica"):
            group = self.topo.group(name)
            if group is None:
                continue
            mine = self.ledger.get(name, [])
            longest = max((ledgers.get(r, {}).get(name, []) for r in self.members(name)), key=len, default=[])
            for kind, dtype, shape in longest[len(mine):]:
                t = torch.zeros(shape, dtype=_DTYPES[dtype])
                if kind == "all_gather":
                    work = dist.all_gather([torch.zeros_like(t) for _ in self.members(name)], t, group=group,
                                           async_op=True)
                else:
                    work = dist.all_reduce(t, group=group, async_op=True)
                deadline = time.monotonic() + self.topo.timeout
                while not lost_contact(work.is_completed, -1) and time.monotonic() < deadline:
                    time.sleep(0.001)
                self._record(group, kind, t)


def lost_contact(fn: Callable[[], Any], source: Any) -> Any:
    """``fn()`` (a communication call), with a broken connection reported as a
    :class:`RemoteError` of the peer ``source`` (``-1`` when it is a group) whose ``lost``
    is True (nobody is left to agree with on how the trace ends)."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        rank = source if isinstance(source, int) else -1
        error = RemoteError(rank, f"lost contact ({e}); the rank probably died")
        error.lost = True
        raise error from e


_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def explained(error: BaseException) -> BaseException:
    """``error``, or what it means here: torch's "does not require grad" comes from a
    ``backward()`` in a distributed trace whose body does not show it, which runs under
    ``torch.no_grad()``."""
    if isinstance(error, RuntimeError) and not isinstance(error, NNsightError) \
            and "does not require grad" in str(error):
        return NNsightError(
            "backward() inside a distributed trace whose body does not call `.backward(` itself: such "
            f"traces run under torch.no_grad(), so nothing has a gradient ({error}). Call backward in "
            "the trace body (`with loss.backward():`), not in a function defined elsewhere"
        )
    return error


def communication_error(error: BaseException) -> bool:
    """Whether ``error`` came out of torch.distributed (a broken or timed-out exchange)."""
    if isinstance(error, dist.DistError):
        return True
    tb = error.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False
