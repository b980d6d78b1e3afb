"""The interleaver: runs mediators alongside the model and handles every visit.

Every module of the tree (and every ``.source`` operation that has been asked for) is a
*call point*: its forward goes through :meth:`Interleaver.visit`, which passes the input
and the output through the one primitive, :meth:`Interleaver.handle`. ``handle`` serves
the mediators waiting at that location in mediator order, applies their writes, then
feeds the observers (caches, scans). A visit nobody waits for costs two dictionary
lookups.

Locations are strings, ``"<path>.input"`` and ``"<path>.output"``. Each has a *site*
counting its visits: the visit index is the iteration a mediator can ask for
(``tracer.iter``). A *step* is one call of the root module; ``generate`` makes several.

The mediator-side calls (:meth:`request`, :meth:`swap`, :meth:`skip`, :meth:`barrier`)
run inside a mediator's greenlet: they are answered at once when the location is the
visit in progress, and otherwise park the mediator until the model gets there. A value
that another rank computes from what the body already had (an ad-hoc call of a module
of another pipeline stage) is waited for without parking: :meth:`Interleaver.synchronous`
runs the wait on the model's greenlet while the visit in progress stands still.

When the seam is *tolerant* (many ranks), an error of a body or of a visit does not abort
the model call: the run *fails* (:meth:`Interleaver.tolerate`): the error is kept and told
to the seam, every intervention is dropped, and the model runs on to the end of its call
with plain visits, so that the engine's collectives and transfers still match those of
the other ranks. The error is raised when the call returns. In one process an error
aborts the call at once, as in nnsight.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Optional

import torch
from greenlet import GreenletExit, getcurrent, greenlet

from .backward import Origins
from .batcher import Batcher
from .errors import MissedProviderError, NotTracingError, OutOfOrderError
from .mediator import Mediator, StepsExhausted, Wait
from .seam import Seam
from .sites import CallPoint, Observer, Site


class Barrier:
    """``tracer.barrier(n)``: holds ``n`` mediators until all of them have arrived."""

    def __init__(self, interleaver: "Interleaver", n: int) -> None:
        self.interleaver = interleaver
        self.n = n
        self.arrived: list[Mediator] = []

    def __call__(self) -> None:
        self.interleaver.barrier(self)


class Interleaver:
    """Per-model engine that runs mediators and handles visits (see module docstring)."""

    def __init__(self) -> None:
        self.active = False
        self.paused = 0
        self.epoch = 0
        self.step = -1
        self.sites: dict[str, Site] = {}
        self.points: dict[str, CallPoint] = {}
        self.mediators: list[Mediator] = []
        self.waiting: dict[str, list[Mediator]] = {}
        self.observers: dict[str, list[Observer]] = {}
        self.observer_list: list[Observer] = []
        self.remote_waiting: dict[tuple[int, int], Mediator] = {}
        self.seam = Seam()
        self.skips: dict[str, list[tuple[Any, Any]]] = {}
        self.barriers: list[Barrier] = []
        self.batcher = Batcher()
        self.current: Optional[Mediator] = None
        self.location: Optional[str] = None
        self.value: Any = None
        self.main: Optional[greenlet] = None
        self.stopped = False
        #: The error that failed the current run (see :meth:`tolerate`), else ``None``.
        self.failure: Optional[BaseException] = None
        #: Where the tensors served in this run came from (gradient locations, see
        #: :mod:`.backward`).
        self.origins = Origins()
        #: Whether the running trace's body calls ``.backward(`` (set before the model runs).
        self.calls_backward = False

    # ------------------------------------------------------------------ call points

    def wrap_module(self, module: torch.nn.Module, path: str, root: bool = False) -> CallPoint:
        """Make ``module``'s forward a call point named ``path`` (idempotent)."""
        point = self.points.get(path)
        if point is not None:
            return point
        point = CallPoint(path, module.forward, self._new_site(path + ".input"),
                          self._new_site(path + ".output"), root)
        self.points[path] = point
        interleaver = self

        @functools.wraps(point.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if interleaver.active and not interleaver.paused:
                return interleaver.visit(point, point.forward, args, kwargs)
            return point.forward(*args, **kwargs)

        module.forward = forward
        return point

    def operation(self, path: str, names: list[str]) -> Callable[[str, Callable, tuple, dict], Any]:
        """Register the ``.source`` operations ``names`` of the module at ``path`` as call
        points, and return the ``call`` function their rewritten forward goes through."""
        points = {}
        for name in names:
            full = f"{path}.{name}"
            points[name] = self.points[full] = CallPoint(
                full, None, self._new_site(full + ".input"), self._new_site(full + ".output"), False
            )
        interleaver = self

        def call(name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
            if interleaver.active and not interleaver.paused:
                return interleaver.visit(points[name], fn, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def _new_site(self, location: str) -> Site:
        """The site of ``location``, created on first use."""
        site = self.sites.get(location)
        if site is None:
            site = self.sites[location] = Site(location)
        return site

    # ------------------------------------------------------------------ visits

    def visit(self, point: CallPoint, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """One call of a call point: handle its input, run it (or its skip), handle its output."""
        if point.root:
            self.step += 1
        if self.failure is not None:
            return self._plain(point, fn, args, kwargs)
        site = point.input
        if site.epoch != self.epoch:
            site.epoch, site.n = self.epoch, 0
        site.step = self.step
        if point.before is not None:
            args, kwargs = point.before(args, kwargs)
        location = site.location
        if location in self.waiting or location in self.observers:
            args, kwargs = self.guarded(location, (args, kwargs), site)
        site.n += 1
        skips = self.skips.pop(point.path, None) if self.skips else None
        if skips is None:
            out = fn(*args, **kwargs)
        else:
            out = self._skipped(point, fn, args, kwargs, skips)
        site = point.output
        if site.epoch != self.epoch:
            site.epoch, site.n = self.epoch, 0
        site.step = self.step
        location = site.location
        if location in self.waiting or location in self.observers:
            out = self.guarded(location, out, site)
        site.n += 1
        if point.after is not None:
            out = point.after(out)
        return out

    def _plain(self, point: CallPoint, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """A visit of a failed run: the engine's blocking points, no intervention."""
        if point.before is not None:
            args, kwargs = point.before(args, kwargs)
        out = fn(*args, **kwargs)
        return out if point.after is None else point.after(out)

    def guarded(self, location: str, value: Any, site: Optional[Site] = None) -> Any:
        """:meth:`handle`, whose error fails the run (:meth:`tolerate`) when the seam allows
        it; the model then goes on with ``value`` as it came."""
        if self.failure is not None:
            return value
        try:
            return self.handle(location, value, site)
        except Exception as error:
            if not self.tolerate(error):
                raise
            return value

    def tolerate(self, error: BaseException) -> bool:
        """Fail the run with ``error`` instead of aborting the model call; False when the
        error must propagate (one process, a ``stop()`` in progress, or not an ``Exception``).

        The first error is kept (:attr:`failure`) and told to the seam (which publishes it
        to the other ranks); every mediator is ended and every wait, observer, skip and
        barrier dropped. Later errors of the same run are swallowed.
        """
        if not self.seam.tolerant or self.stopped or not isinstance(error, Exception):
            return False
        if self.failure is None:
            self.failure = error
            self.seam.failed(error)
            for med in self.mediators:
                med.wait = None
                med.transform = None
                if med.greenlet is not None and not med.greenlet.dead and med.greenlet is not getcurrent():
                    try:
                        med.greenlet.throw(GreenletExit())
                    except GreenletExit:
                        pass
            self.waiting.clear()
            self.remote_waiting.clear()
            self.observers.clear()
            self.skips.clear()
            self.barriers.clear()
        return True

    def handle(self, location: str, value: Any, site: Optional[Site] = None) -> Any:
        """The one primitive: pass ``value`` at ``location`` to waiting mediators and observers.

        Returns the value the model continues with (replaced or edited by mediators).
        """
        if site is None:
            site = self._new_site(location)
            if site.epoch != self.epoch:
                site.epoch, site.n = self.epoch, 0
            site.step = self.step
        codec = self.seam.codecs.get(location)
        whole = None
        if location in self.waiting:
            whole = value if codec is None else codec.whole(value)
            self.seam.verify(location, whole)
            whole = self._serve(location, whole, site)
            value = whole if codec is None else codec.fragment(whole)
        observers = self.observers.get(location)
        if observers and location not in self.seam.remote:
            for obs in observers:
                if obs.local:
                    obs.fn(value, site.n)
                    continue
                if whole is None:
                    if codec is not None and self.seam.defer(obs, site.n, location, value):
                        continue  # assembled with the run's other fragments when it ends
                    whole = value if codec is None else codec.whole(value)
                    self.seam.verify(location, whole)
                obs.fn(whole, site.n)
                if self.seam.routing and obs.routed:
                    self.seam.observed(obs.index, site.n, location, whole)
        return value

    def _serve(self, location: str, value: Any, site: Site) -> Any:
        outer = (self.location, self.value)
        self.location, self.value = location, value
        try:
            while True:
                waiters = self.waiting.get(location)
                if not waiters:
                    break
                ready = [m for m in waiters if m.wait.iteration is None or m.wait.iteration == site.n]
                if not ready:
                    break
                med = min(ready, key=_index)
                waiters.remove(med)
                if not waiters:
                    del self.waiting[location]
                wait, med.wait = med.wait, None
                send = None
                if wait.kind == "value":
                    send = self.batcher.narrow(self.value, med.group)
                    self.origins.record(location, self.value, send, med.group)
                    if self.seam.routing:
                        self.seam.served(med.index, wait.payload, location, send)
                elif wait.kind == "swap":
                    self.value = self.batcher.swap(self.value, wait.payload, med.group, location)
                else:
                    self._add_skip(med, location, wait.payload)
                self._resume(med, send)
            return self.value
        finally:
            self.location, self.value = outer

    def _skipped(self, point: CallPoint, fn: Callable, args: tuple, kwargs: dict, skips: list) -> Any:
        # Skip values are whole; the engine expects its fragment of a fragmented output.
        codec = self.seam.codecs.get(point.output.location)
        if codec is not None:
            skips = [(group, codec.fragment(value)) for group, value in skips]
        if len(skips) == 1 and self.batcher.whole(skips[0][0]):
            return skips[0][1]
        # Only some invokes skip: run the call for the others, then put each skip in its rows.
        out = fn(*args, **kwargs)
        for group, value in skips:
            out = self.batcher.swap(out, value, group, point.output.location)
        return out

    def _add_skip(self, med: Mediator, location: str, value: Any) -> None:
        self.skips.setdefault(location[: -len(".input")], []).append((med.group, value))

    # ------------------------------------------------------------------ scheduling

    def start(self, med: Mediator) -> None:
        """Run ``med``'s body until it first parks (or ends); not in a failed run."""
        if self.failure is not None:
            return
        if self.main is None:
            self.main = getcurrent()
        fn = med.fn
        med.greenlet = greenlet(lambda _: fn(), parent=self.main)
        self._resume(med, None)

    def _resume(self, med: Mediator, send: Any, throw: Optional[BaseException] = None) -> None:
        outer = self.current
        self.current = med
        try:
            if throw is None:
                med.greenlet.switch(send)
            else:
                med.greenlet.throw(throw)
            while med.wait is not None and med.wait.kind == "sync":
                # The body waits for another rank inside this visit (see `synchronous`): the
                # wait runs here, on the model's greenlet, so whatever it delivers to other
                # mediators is resumed from here too, and the model stays where it is. Its
                # errors (a timeout, another rank's failure, a stop of a mediator it resumed)
                # end the run from here, as those of the engine's waits do.
                wait, med.wait = med.wait, None
                med.greenlet.switch(wait.payload())
        except Exception as error:
            if not self.tolerate(error):
                raise
        finally:
            self.current = outer
        self.flush(med)
        if self.barriers:
            self._release_barriers()

    def _release_barriers(self) -> None:
        for barrier in list(self.barriers):
            if len(barrier.arrived) >= barrier.n and barrier in self.barriers:
                self.barriers.remove(barrier)
                arrived, barrier.arrived = sorted(barrier.arrived, key=_index), []
                for med in arrived:
                    med.wait = None
                for med in arrived:
                    self._resume(med, None)

    def _park(self, med: Mediator, wait: Wait) -> Any:
        med.parks += 1
        med.wait = wait
        if wait.kind not in ("barrier", "remote", "beyond"):
            self.waiting.setdefault(wait.location, []).append(med)
        return self.main.switch()

    def synchronous(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, a wait for a value another rank computes for the current mediator, run
        as one process would run a call: inside the visit in progress.

        Called from a body, the mediator hands ``fn`` to the model's greenlet (where every
        wait runs, so that values it delivers to other mediators resume them from there)
        and gets its result back; the model does not move meanwhile. Outside a body,
        ``fn()`` runs here. An exception of ``fn`` aborts the run from the model's greenlet
        (the body does not see it).
        """
        med = self.current
        if med is None or self.main is None or getcurrent() is not med.greenlet:
            return fn()
        med.wait = Wait("", None, "sync", fn)
        return self.main.switch()

    def _mediator(self, what: str, location: Optional[str] = None) -> Mediator:
        """The mediator running now; one in a step loop past the run's steps parks for
        good on its first use of ``location`` (:meth:`finish` cuts the loop)."""
        med = self.current
        if med is None or not self.active or getcurrent() is not med.greenlet:
            raise NotTracingError(
                f"{what} is only available inside a trace: use it in the body of "
                "`with model.trace(...)` (or of a `tracer.invoke(...)`)."
            )
        if med.bound is not None and location is not None and med.iteration is not None \
                and med.iteration >= med.bound + self._new_site(location).extra:
            # Never asked of the model (on many ranks another stage would never serve it).
            self._park(med, Wait(location, med.iteration, "beyond"))
        return med

    def _check(self, med: Mediator, location: str) -> tuple[Site, Optional[int], bool]:
        """The site of ``location``, the iteration wanted and whether it is the visit in progress."""
        site = self.sites.get(location)
        if site is None:
            raise MissedProviderError(f"{location} is not a location of this model")
        if site.epoch != self.epoch:
            site.epoch, site.n, site.step = self.epoch, 0, -1
        it = med.iteration
        if location == self.location and (it is None or it == site.n):
            return site, it, True
        passed = (site.n > 0 and site.step == self.step) if it is None else site.n > it
        if passed:
            when = "in this step" if it is None else f"(iteration {it} has passed; now at {site.n})"
            raise OutOfOrderError(
                f"{location} was requested after the model had already passed it {when}. "
                "Access locations in the order the model reaches them (for generation steps, "
                "use tracer.iter[...] or tracer.next())."
            )
        return site, it, False

    # ------------------------------------------------------------------ mediator side

    def request(self, location: str) -> Any:
        """The value at ``location`` for the current mediator (parks until it is reached)."""
        med = self._mediator(f"reading {location}", location)
        self.flush(med)
        seq = med.seq
        med.seq += 1
        if location in self.seam.remote:
            return self._remote(med, seq, location)
        site, it, now = self._check(med, location)
        if now:
            value = self.batcher.narrow(self.value, med.group)
            self.origins.record(location, self.value, value, med.group)
            if self.seam.routing:
                self.seam.served(med.index, seq, location, value)
            return value
        return self._park(med, Wait(location, it, "value", seq))

    def _remote(self, med: Mediator, seq: int, location: str) -> Any:
        """A value computed on another stage: from the mailbox, or parked until it arrives."""
        found, value = self.seam.fetch(med.index, seq, location)
        if found:
            self.origins.record(location, value, value, None)
            return value
        self.remote_waiting[(med.index, seq)] = med
        return self._park(med, Wait(location, None, "remote", seq))

    def deliver(self, mediator: int, seq: int, value: Any) -> bool:
        """Resume the mediator parked on remote request ``seq`` with ``value`` (if any)."""
        med = self.remote_waiting.pop((mediator, seq), None)
        if med is None:
            return False
        # Its gradient location is named after it, as on its owner (see `.backward`).
        self.origins.record(med.wait.location, value, value, None)
        med.wait = None
        self._resume(med, value)
        return True

    def swap(self, location: str, value: Any) -> None:
        """Replace the value at ``location`` (for the current mediator's rows)."""
        med = self._mediator(f"writing {location}", location)
        self.flush(med)
        if location in self.seam.remote:
            return  # the owner stage applies writes; every other stage drops them
        site, it, now = self._check(med, location)
        if now:
            self.value = self.batcher.swap(self.value, value, med.group, location)
            return
        self._park(med, Wait(location, it, "swap", value))

    def skip(self, path: str, value: Any) -> None:
        """Do not run the call point at ``path``; use ``value`` as its output."""
        location = path + ".input"
        med = self._mediator(f"skipping {path}", location)
        self.flush(med)
        if location in self.seam.remote:
            return
        site, it, now = self._check(med, location)
        if now:
            self._add_skip(med, location, value)
            return
        self._park(med, Wait(location, it, "skip", value))

    def set_transform(self, location: str, transform: Callable[[], Any]) -> None:
        """Swap ``transform()`` into ``location`` once the current mediator next asks the
        model for anything (:meth:`flush`) or parks."""
        self.current.transform = (location, transform)

    def flush(self, med: Mediator) -> None:
        """Apply ``med``'s pending eproperty transform (if its visit is in progress)."""
        if med.transform is not None:
            location, transform = med.transform
            med.transform = None
            if location == self.location:
                self.value = self.batcher.swap(self.value, transform(), med.group, location)

    def barrier(self, barrier: Barrier) -> None:
        """Park the current mediator until ``barrier.n`` mediators have arrived."""
        med = self._mediator("a barrier")
        if barrier not in self.barriers:
            self.barriers.append(barrier)
        barrier.arrived.append(med)
        self._park(med, Wait("barrier", None, "barrier"))

    def call(self, point: CallPoint, args: tuple, kwargs: dict) -> Any:
        """An ad-hoc call of a module from inside a body: runs it without visits.

        Arguments are whole values and the result is whole: fragmented arguments are cut to
        this rank's part, a fragmented result is assembled. On a stage that does not own
        the module the result comes from its owner, which computes it from values the body
        already had: the body waits for it inside the visit in progress (``synchronous``),
        as one process would run the call, instead of parking until the model moves on.
        """
        med = self._mediator(f"calling {point.path}", point.output.location)
        self.seam.check_call(point.path)
        seq = med.seq
        med.seq += 1
        location = point.output.location
        if location in self.seam.remote:
            found, value = self.seam.fetch(med.index, seq, location)
            if found:
                return value
            return self.synchronous(lambda: self.seam.wait_remote(med.index, seq, location))
        codecs = self.seam.codecs
        codec = codecs.get(point.input.location)
        if codec is not None:
            args, kwargs = codec.fragment((args, kwargs))
        self.paused += 1
        try:
            out = point.forward(*args, **kwargs)
        finally:
            self.paused -= 1
        codec = codecs.get(point.output.location)
        if codec is not None:
            out = codec.whole(out)
            self.seam.verify(point.output.location, out)
        if self.seam.routing:
            self.seam.served(med.index, seq, point.output.location, out)
        return out

    # ------------------------------------------------------------------ run lifecycle

    def begin(self, batch_size: Optional[int]) -> None:
        """Prepare a run: new epoch, empty waits, ``batch_size`` rows."""
        self.epoch += 1
        self.step = -1
        self.active = True
        self.stopped = False
        self.failure = None
        self.batcher = Batcher(batch_size)
        self.origins = Origins()
        self.main = getcurrent()

    def finish(self) -> None:
        """End of the model run: every mediator still waiting gets its error, ends quietly
        (after ``stop()``), or has its step loop cut (see :class:`.mediator.StepsExhausted`)."""
        for med in list(self.mediators):
            guard = 0
            cut = None
            while med.greenlet is not None and not med.greenlet.dead and med.wait is not None:
                wait = med.wait
                self._unpark(med)
                guard += 1
                # After a cut ``with tracer.iter`` block, what waits again ends quietly (nnsight).
                if self.stopped or cut is not None or guard > 100:
                    self._resume(med, None, GreenletExit())
                    continue
                if wait.kind == "beyond" or (med.looping and med.iteration and wait.kind != "barrier"):
                    # A step loop asked for a step the run did not make: cut it (nnsight's rule).
                    cut = StepsExhausted(wait.location, med.iteration)
                    where = _user_line(med)
                    self._resume(med, None, cut)
                    if not cut.caught:
                        warnings.warn_explicit(cut.warning(), UserWarning, *where)
                    continue
                self._resume(med, None, MissedProviderError(_missed(wait, self.step + 1)))
        self.remote_waiting.clear()

    def _unpark(self, med: Mediator) -> None:
        wait, med.wait = med.wait, None
        if wait is None:
            return
        if wait.kind == "remote":
            self.remote_waiting.pop((med.index, wait.payload), None)
        waiters = self.waiting.get(wait.location)
        if waiters and med in waiters:
            waiters.remove(med)
            if not waiters:
                del self.waiting[wait.location]
        for barrier in self.barriers:
            if med in barrier.arrived:
                barrier.arrived.remove(med)

    def end(self) -> None:
        """Tear down after a run, successful or not: the model traces normally again."""
        self.active = False
        for med in self.mediators:
            if med.greenlet is not None and not med.greenlet.dead:
                try:
                    med.greenlet.throw(GreenletExit())
                except GreenletExit:
                    pass
        self.mediators = []
        self.waiting.clear()
        self.remote_waiting.clear()
        self.observers.clear()
        self.observer_list.clear()
        self.skips.clear()
        self.barriers.clear()
        self.current = None
        self.location = self.value = None
        self.main = None
        self.origins = Origins()
        self.calls_backward = False

    def observe(self, location: str, fn: Callable[[Any, int], None], local: bool = False,
                routed: bool = True) -> None:
        """Call ``fn(value, visit_index)`` at every visit of ``location`` during this run.

        ``value`` is whole, or this rank's fragment when ``local``. On a stage that does not
        own ``location``, whole values arrive from the owner (see :class:`.seam.Seam`),
        unless not ``routed``: then only the owner's ranks see them.
        """
        obs = Observer(fn, local, len(self.observer_list), routed)
        self.observer_list.append(obs)
        self.observers.setdefault(location, []).append(obs)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_line(med: Mediator) -> tuple[str, int]:
    """File and line of the user's code where ``med`` is parked (for warnings)."""
    frame = med.greenlet.gr_frame
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
    if frame is None:
        return __file__, 0
    return frame.f_code.co_filename, frame.f_lineno


def _index(med: Mediator) -> int:
    return med.index


def _missed(wait: Wait, steps: int) -> str:
    if wait.kind == "barrier":
        return "a barrier was never completed: fewer invokes than its participant count called it"
    what = {"value": "reading", "remote": "reading", "swap": "writing", "skip": "skipping"}[wait.kind]
    at = "" if wait.iteration is None else f" at iteration {wait.iteration} (the run made {steps} step(s))"
    return (
        f"{what} {wait.location}{at}: the model never reached this location. "
        "Check the module path and that the module runs for these inputs."
    )
