"""Tracers: the ``with`` blocks that run a model with interventions.

``with model.trace(inputs) as tracer:`` captures its body (see :mod:`.capture`) and, when
the block ends, runs it as the *trace body* mediator. ``with tracer.invoke(inputs):``
blocks inside it become mediators of their own, each with its own rows of the batch and
its own scope (the names as they were when the invoke was entered); they are collected
while the trace body runs up to its first request, then the model runs once on the
batched inputs with every mediator interleaved. Saved names are written back into the
caller's scope afterwards, also when the run failed.

:class:`ScanningTracer` runs the same way on fake tensors (shapes, no compute);
:class:`EditingTracer` stores its body as a default intervention of later traces;
:class:`Session` runs its body at once, so that the traces in it run in turn and pass
values to each other; :class:`StepBlock` is the ``with tracer.iter[...]:`` form.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from ..config import CONFIG
from ..intervention.cache import Cache, CacheDict
from ..intervention.eproperty import eproperty
from ..intervention.errors import DivergenceError, NNsightError, NotTracingError, TraceSetupError
from ..intervention.interleaver import Barrier, Interleaver
from ..intervention.iteration import IteratorProxy, StepLoop, advance
from ..intervention.mediator import Mediator, StepsExhausted
from ..intervention import save as saving
from .capture import Scope, SkipBody, capture, push_names, scope, skip_body

if TYPE_CHECKING:
    from ..modeling.nnsight import NNsight

_LAST = 1 << 30


class EarlyStop(Exception):
    """Raised by ``tracer.stop()`` to end the model run early (not an error)."""


class _Block:
    """A ``with`` block whose body is captured instead of executed."""

    def __enter__(self) -> Any:
        self._check()
        self._frame = sys._getframe(1)
        self._body = capture(self._frame)
        self._restore = _nothing if self._body.trivial else skip_body(self._frame, self._body.first)
        return self._entered()

    def _check(self) -> None:
        """Refuse to open the block here (before anything is armed); by default, never."""

    def _entered(self) -> Any:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        if exc_type is not None and not issubclass(exc_type, SkipBody):
            return False
        frame, self._frame = self._frame, None
        try:
            # The body has not run: the names ``frame`` sees now are those at the entry.
            self._captured(frame)
        except Exception as error:
            # Show the user's frames, not the library's, and not the SkipBody it came from.
            raise error.with_traceback(user_frames(error.__traceback__)) from None
        return True

    def _captured(self, frame: FrameType) -> None:
        raise NotImplementedError


def _nothing() -> None:
    return None


_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.join(os.path.dirname(torch.__file__), "nn", "modules") + os.sep)


def user_frames(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """``tb`` without the frames of nnsight_dist and of torch's module call machinery
    (all of ``tb`` when ``nd.CONFIG.APP.DEBUG`` is set)."""
    if CONFIG.APP.DEBUG:
        return tb
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_INTERNAL):
            kept.append(tb)
        tb = tb.tb_next
    if not kept:
        return None
    head = None
    for frame_tb in reversed(kept):
        head = TracebackType(head, frame_tb.tb_frame, frame_tb.tb_lasti, frame_tb.tb_lineno)
    return head


class Invoker(_Block):
    """``tracer.invoke(inputs)``: one mediator with its own rows of the batch."""

    def __init__(self, tracer: "InterleavingTracer", args: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs

    def _check(self) -> None:
        current = self.tracer.interleaver.current
        if current is not None and current is not self.tracer._root:
            raise TraceSetupError(
                f"tracer.invoke(...) inside {current.name}: invokes do not nest. Open every "
                "invoke directly in the trace body."
            )

    def _captured(self, frame: FrameType) -> None:
        sc = scope(frame)
        self.tracer._add_invoke(self._body.bind(sc), sc, self.args, self.kwargs)


class InterleavingTracer(_Block):
    """``model.trace(...)``: run the model once with the captured body interleaved."""

    def __init__(
        self,
        model: "NNsight",
        run: Callable[[tuple, dict], Any],
        args: tuple,
        kwargs: dict,
        steps: Optional[int] = 1,
    ) -> None:
        self.model = model
        self.interleaver: Interleaver = model.interleaver
        self.path = ""
        self._run = run
        self._args = args
        self._kwargs = kwargs
        #: Steps the run makes at most (``max_new_tokens``), ``None`` when unknown.
        self._steps = steps
        self._invokes: list[tuple[Callable, tuple, dict]] = []
        self._scopes: list[Scope] = []
        self._root: Optional[Mediator] = None
        self._started = False
        #: Whether the body calls ``.backward(`` (an AST scan, known before the model runs).
        self.calls_backward = False
        self.interleaver._new_site("result")

    #: Write back every name the body binds, saved or not (scans hold no real values).
    _keep_all = False

    # ------------------------------------------------------------------ user API

    @eproperty(key="result")
    def result(self):
        """What the traced call returned (``generate``: the generated token ids)."""

    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """A block whose body runs on its own inputs, batched with the other invokes."""
        return Invoker(self, args, kwargs)

    def stop(self) -> None:
        """End the model run here; values saved so far are kept."""
        self.interleaver.stopped = True
        raise EarlyStop()

    @property
    def iter(self) -> "StepBlocks":
        """``for step in tracer.iter[0:3]``: constrain the body to generation steps
        (also ``with tracer.iter[0:3]:``, nnsight's deprecated block form)."""
        return StepBlocks(self.interleaver, self._steps)

    def all(self) -> "StepBlock":
        """Every generation step (``tracer.iter[:]``), until the run ends."""
        return self.iter[:]

    def next(self, step: int = 1) -> None:
        """Move the body on to the visit ``step`` generation steps later."""
        advance(self.interleaver, step)

    def barrier(self, n_participants: int) -> Barrier:
        """A barrier for ``n_participants`` invokes: call it in each; all continue together."""
        return Barrier(self.interleaver, n_participants)

    def cache(
        self,
        modules: Optional[list[Union[Any, str]]] = None,
        include_inputs: bool = False,
        include_output: bool = True,
        device: Any = "cpu",
        dtype: Any = None,
        detach: bool = True,
        sharded: bool = False,
    ) -> CacheDict:
        """Record the chosen modules (all by default) at every visit; see :mod:`..intervention.cache`.

        Values are whole on every rank; with ``sharded=True`` each rank keeps only what it
        owns (tensor-parallel fragments as they are) and ``cache.gather(dst)`` assembles it.
        """
        il = self.interleaver
        med = il.current
        if med is None:
            raise NotTracingError("tracer.cache(...) is only available inside a trace body")
        cache = Cache(device=device, dtype=dtype, detach=detach)
        targets = self.model.modules() if modules is None else [
            self._module_at(m) if isinstance(m, str) else m for m in modules
        ]
        group = med.group

        def narrow(value: Any) -> Any:
            return il.batcher.narrow(value, group)

        placements: dict[tuple[str, str], str] = {}
        for envoy in targets:
            for key, location, wanted in (("output", f"{envoy.path}.output", include_output),
                                          ("inputs", f"{envoy.path}.input", include_inputs)):
                if wanted:
                    il.observe(location, cache.recorder(envoy.path, key, narrow), local=sharded)
                    placements[(envoy.path, key)] = il.seam.placement(location)
        if sharded:
            cache.cache._gather = lambda dst: _gather(il, cache.cache, placements, dst)
        return saving.save(cache.cache)

    def _module_at(self, path: str) -> Any:
        """The envoy at a full path (``"model.model.layers.0"``) or a relative one."""
        root = self.model.path + "."
        if path.startswith(root):
            try:
                return self.model.get(path[len(root):])
            except AttributeError:
                pass
        return self.model.get(path)

    # ------------------------------------------------------------------ running

    def _add_invoke(self, fn: Callable, sc: Scope, args: tuple, kwargs: dict) -> None:
        if self._started:
            raise TraceSetupError(
                "tracer.invoke(...) came after the trace body had started the model; "
                "declare every invoke before reading model values outside of invokes."
            )
        self._invokes.append((fn, args, kwargs))
        self._scopes.append(sc)

    def _captured(self, frame: FrameType) -> None:
        self.calls_backward = self._body.calls_backward
        sc = scope(frame, shared={})
        self._scopes = [sc]
        registry: dict[int, Any] = {}
        saving._REGISTRIES.append(registry)
        try:
            self._execute(self._body.bind(sc))
        finally:
            saving._REGISTRIES.pop()
            # Inside a session every name goes up to the session's scope; else the saved ones.
            keep_all = self._keep_all or bool(saving._REGISTRIES)
            names: dict[str, Any] = {}
            for block in self._scopes:  # the trace body, then the invokes in order
                names.update((k, v) for k, v in block.writes().items() if keep_all or id(v) in registry)
            self._scopes = []
            push_names(frame, names)

    def _execute(self, body: Callable[[], Any]) -> None:
        # Imported here: a backward block is a ``_Block`` of this module.
        from .backward import backward_blocks

        il = self.interleaver
        if il.active:
            raise NNsightError("a trace is already running on this model: traces do not nest")
        with backward_blocks(il):
            self._run_body(body)

    def _run_body(self, body: Callable[[], Any]) -> None:
        il = self.interleaver
        root = self._root = Mediator(body, None, "trace body")
        root.index = _LAST
        il.calls_backward = self.calls_backward
        il.begin(None)
        il.seam.begin()
        try:
            il.mediators = [root]
            il.start(root)
            self._started = True
            inputs = ([(self._args, {})] if self._args else []) + [(a, k) for _, a, k in self._invokes]
            if not inputs:
                raise TraceSetupError(
                    "nothing to run: give inputs to the trace (`model.trace(inputs)`) or to "
                    "at least one `tracer.invoke(inputs)`."
                )
            args, kwargs, groups, total = self.model._batch(inputs)
            il.batcher.total = total
            first = 1 if self._args else 0
            mediators = [Mediator(fn, None, f"edit {i}") for i, fn in enumerate(self.model._edit_bodies())]
            mediators += [
                Mediator(fn, groups[first + i], f"invoke {i}") for i, (fn, _, _) in enumerate(self._invokes)
            ]
            for i, med in enumerate(mediators):
                med.index = i
            il.mediators = mediators + [root]
            for med in mediators:
                il.start(med)
            kwargs = {**kwargs, **self._kwargs}
            try:
                il.seam.inputs(args, kwargs)
            except Exception as error:
                # Different inputs are found alike on every rank: nothing runs. Any other error
                # (another rank failed first, or this one did) fails the run like a body's.
                if isinstance(error, DivergenceError) or not il.tolerate(error):
                    raise
            self._go(args, kwargs)
            il.seam.close()
        except BaseException as error:
            cause = il.seam.fail(error)
            if cause is not None:
                raise cause from error
            raise
        finally:
            il.end()

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """The model call itself (a scan runs it on fake tensors)."""
        return self._run(args, kwargs)

    def _go(self, args: tuple, kwargs: dict) -> None:
        """Run the model, drain, finish. A run that failed on many ranks (see
        :meth:`..intervention.interleaver.Interleaver.tolerate`) ran the model call to its
        end without interventions; its error is raised once the call returned."""
        il = self.interleaver
        try:
            result = self._call(args, kwargs)
        except EarlyStop:
            il.stopped = True
        else:
            il.guarded("result", result)
        while il.failure is None:
            try:
                il.seam.drain()
                break
            except EarlyStop:
                # A mediator served late (a value from another stage) stopped the run.
                il.stopped = True
        if il.failure is None:
            il.finish()
        if il.failure is not None:
            raise il.failure


class ScanningTracer(InterleavingTracer):
    """``model.scan(...)``: the trace runs on fake tensors; shapes without computation.

    Every module's input and output seen during the scan stay readable afterwards
    (``model.layer.output.shape`` outside a trace). Every name the body binds is kept,
    saved or not.
    """

    _keep_all = True

    def _go(self, args: tuple, kwargs: dict) -> None:
        il = self.interleaver
        il.batcher.strict = False  # fake values: a write may change shapes (nnsight allows it)
        for envoy in self.model.modules():
            envoy._fakes.clear()
            il.observe(f"{envoy.path}.output", _recorder(envoy, "output"))
            il.observe(f"{envoy.path}.input", _recorder(envoy, "input"))
        super()._go(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..intervention.batcher import map_tensors

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return self._run(map_tensors(args, mode.from_tensor), map_tensors(kwargs, mode.from_tensor))


def _gather(il: Interleaver, cache: CacheDict, placements: dict, dst: int) -> Any:
    """``cache.gather(dst)`` of a sharded cache, which is complete only once its trace is over."""
    if il.active:
        raise NNsightError(
            "cache.gather() was called inside a trace, where the sharded cache is still filling "
            "(it would assemble what the ranks hold so far): call it after the `with` block, "
            "on every rank of the replica"
        )
    return il.seam.gather_cache(cache, placements, dst)


def _recorder(envoy: Any, key: str) -> Callable[[Any, int], None]:
    def record(value: Any, visit: int) -> None:
        envoy._fakes[key] = value

    return record


class StepBlock(StepLoop, _Block):
    """``with tracer.iter[...]:`` / ``with tracer.all():``: the body runs once per step.

    nnsight 0.8.1's deprecated block form, with its ``FutureWarning``. A step the run does
    not make ends the block quietly and the statements after it run (see
    :mod:`..intervention.iteration`).
    """

    def _captured(self, frame: FrameType) -> None:
        warnings.warn_explicit(
            "The `with tracer.iter[...]:` / `with tracer.all():` block form is deprecated (as "
            "in nnsight); use `for step in tracer.iter[...]:` instead.",
            FutureWarning, frame.f_code.co_filename, self._body.lineno,
        )
        sc = scope(frame)
        body = self._body.bind(sc)
        steps = self.steps()
        try:
            for _ in steps:
                body()
        except StepsExhausted as cut:
            cut.caught = True
        finally:
            steps.close()  # restores the mediator's iteration now
            push_names(frame, sc.writes())


class StepBlocks(IteratorProxy):
    """``tracer.iter``: its loops are also ``with`` blocks."""

    loop = StepBlock


class Session(_Block):
    """``model.session()``: a block run at once, whose traces pass values to each other.

    The traces inside run in turn, as Python reaches them; every name a trace binds is
    visible to the rest of the session, saved or not. After the session only saved
    values remain (nnsight 0.8.1's rule: the session is the save boundary).
    """

    def _captured(self, frame: FrameType) -> None:
        sc = scope(frame, shared={})
        registry: dict[int, Any] = {}
        saving._REGISTRIES.append(registry)
        try:
            self._body.bind(sc)()
        finally:
            saving._REGISTRIES.pop()
            keep_all = bool(saving._REGISTRIES)
            push_names(frame, {k: v for k, v in sc.writes().items() if keep_all or id(v) in registry})


class EditingTracer(_Block):
    """``model.edit()``: the body becomes a default intervention of every later trace."""

    def __init__(self, target: "NNsight") -> None:
        self.target = target

    def _entered(self) -> Any:
        return self.target

    def _captured(self, frame: FrameType) -> None:
        self.target._edits.append(self._body.bind(scope(frame)))
