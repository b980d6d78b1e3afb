"""``.source``: the operations inside a module's forward, as envoys.

``envoy.source`` rewrites the module's forward once (:func:`.inject.inject`) so that each
call and assignment in its body is a call point of the interleaver, with nnsight 0.8.1's
operation names (its location is named like
``model.model.layers.0.self_attn.self_o_proj_0``; it prints as nnsight's
``model.model.layers.0.self_attn.source.self_o_proj_0``). Printing an :class:`EnvoySource`
gives nnsight's listing of the forward's lines with the operation names; each operation is
an :class:`OperationEnvoy` with ``.output``, ``.inputs``, ``.input`` and ``.skip`` like a
module's envoy. An assignment ``x = e`` is an operation whose only argument and output are
the assigned value: writing its ``.output`` (or ``.input``) changes what ``x`` is bound to.
Outside a trace the rewritten forward calls straight through.

An operation's own ``.source`` (nnsight's recursive source, inside a trace only) drills
into the function the operation calls: the body waits until the operation is reached,
takes the callable it is about to call (often a local variable, such as
``attention_interface``), rewrites that function the same way and runs the rewritten copy
in its place for the rest of the run, so its operations
(``...attention_interface_1.torch_nn_functional_scaled_dot_product_attention_0``) have
``.input``/``.output`` too, to any depth. A call of a module (use that module's
``.source``), of a function without Python source, and an assignment are refused.
"""

from __future__ import annotations

import inspect
import types
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .envoy import Interventions
from .errors import NNsightError, NotTracingError
from .inject import CallFn, bind, evaluated, format_operation, format_source, inject
from .interleaver import Interleaver

if TYPE_CHECKING:
    from .envoy import Envoy


class OperationEnvoy(Interventions):
    """One operation inside a forward: a location pair ``<path>.input`` / ``<path>.output``.

    ``display`` is its nnsight name (``<module path>.source.<name>``), what it prints as.
    """

    def __init__(self, owner: "EnvoySource", name: str, line: int) -> None:
        self.path = f"{owner.path}.{name}"
        self.display = f"{owner.display}.{name}"
        self.name = name
        self.line = line
        self.interleaver = owner.interleaver
        self._owner = owner

    @property
    def source(self) -> "EnvoySource":
        """The operations inside the function this operation calls (inside a trace only).

        Waits until the operation is reached in the model's order (a read of its inputs),
        then rewrites the callable it is about to call; later calls in the same run use
        the rewritten copy.
        """
        return self._owner.drill(self)

    def __str__(self) -> str:
        return format_operation(self.display, self._owner.source, self.line)

    __repr__ = __str__


class EnvoySource:
    """The listing of a forward with one :class:`OperationEnvoy` attribute per operation.

    ``line_numbers`` maps each operation name to its 1-based line in ``source``, in naming
    order; ``display`` is nnsight's name of the listing (``<module path>.source``, or
    ``<operation>.source`` when drilled).
    """

    def __init__(self, path: str, display: str, source: str, line_numbers: dict[str, int],
                 interleaver: Interleaver) -> None:
        self.path = path
        self.display = display
        self.source = source
        self.line_numbers = line_numbers
        self.interleaver = interleaver
        self.operations: list[OperationEnvoy] = []
        for name, line in line_numbers.items():
            op = OperationEnvoy(self, name, line)
            setattr(self, name, op)
            self.operations.append(op)
        # Drilling (`op.source`): the callable each operation was last called with in a
        # run, the rewritten copy per operation (with the callable it was made from), and
        # the run (interleaver epoch) in which each copy replaces the callable.
        self._callees: dict[str, Callable] = {}
        self._drilled: dict[str, tuple[Any, "EnvoySource", Callable]] = {}
        self._in_use: dict[str, int] = {}

    @classmethod
    def instrument(cls, fn: Callable, path: str, display: str, interleaver: Interleaver,
                   module: Any = None) -> tuple["EnvoySource", Callable]:
        """Rewrite ``fn`` so that its operations are call points under ``path``.

        ``module`` is given when ``fn`` is that module's forward bound to it: then the
        seam learns which operations' values are exactly a child module's call (for their
        placement). Returns the listing and the rewritten function (bound like ``fn`` when
        ``fn`` is a bound method).
        """
        calls: dict[str, CallFn] = {}
        injected = inject(fn, path, lambda name, f, a, k: calls["call"](name, f, a, k))
        names = list(injected.lines)
        op_call = interleaver.operation(path, names)
        own = module is not None and inspect.ismethod(fn) and fn.__self__ is module
        interleaver.seam.operations(path, names, injected.attribute_calls if own else {}, module)
        listing = cls(path, display, injected.source, injected.lines, interleaver)
        calls["call"] = listing._caller(op_call)
        new_fn = injected.fn
        if inspect.ismethod(fn):
            new_fn = MethodType(new_fn, fn.__self__)
        return listing, new_fn

    @classmethod
    def of_module(cls, envoy: "Envoy") -> "EnvoySource":
        """Rewrite ``envoy``'s forward so its operations become call points.

        A module standing in for one that runs elsewhere (a pipeline stage's placeholder
        for another stage's layer) names the real forward as its ``source_forward``: its
        operations are listed and registered (their values come from where they run), and
        the stand-in's own forward is left as it is.
        """
        point, module = envoy._point, envoy._module
        stands_in_for = module.__dict__.get("source_forward")
        if stands_in_for is not None:
            listing, _ = cls.instrument(MethodType(stands_in_for, module), envoy.path, f"{envoy.path}.source",
                                        envoy.interleaver)
            return listing
        listing, point.forward = cls.instrument(
            point.forward, envoy.path, f"{envoy.path}.source", envoy.interleaver, module
        )
        return listing

    def _caller(self, op_call: CallFn) -> CallFn:
        """The rewritten function's ``call``: during a run, note each operation's callable
        and call it through :meth:`_runner`, so that a drilled copy can take its place."""
        il = self.interleaver

        def call(name: str, f: Callable, args: tuple, kwargs: dict) -> Any:
            if il.active and not il.paused:
                self._callees[name] = f
                f = self._runner(name, f)
            return op_call(name, f, args, kwargs)

        return call

    def _runner(self, name: str, f: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            # Decided at call time: the body drills while the operation's input is served.
            if self._in_use.get(name) == self.interleaver.epoch:
                return self._drilled[name][2](*args, **kwargs)
            return f(*args, **kwargs)

        return run

    def drill(self, op: OperationEnvoy) -> "EnvoySource":
        """The listing of what ``op`` calls; from now on in this run the call runs the
        rewritten copy. See :attr:`OperationEnvoy.source`."""
        il = self.interleaver
        if not il.active:
            raise NotTracingError(
                f"`.source` of the operation {op.path} is only available inside a trace: the "
                "function it calls is known only when the model reaches it"
            )
        if self._in_use.get(op.name) == il.epoch:
            return self._drilled[op.name][1]
        op.inputs  # noqa: B018 - parks the body until the operation is reached (its callee noted)
        if op.name not in self._callees:
            raise NNsightError(
                f"the function {op.path} calls is not known on this rank: the operation did not "
                "run here (its module runs on another pipeline stage)"
            )
        f = _callable(self._callees[op.name], op.path)
        if f is bind or f is evaluated:
            raise NNsightError(
                f"{op.display} is {'an assignment' if f is bind else 'a frame-sensitive builtin'}, "
                "not a call of a Python function: there is no function to drill into"
            )
        key = (getattr(f, "__func__", f), getattr(f, "__self__", None))
        cached = self._drilled.get(op.name)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            try:
                listing, new_fn = EnvoySource.instrument(f, op.path, f"{op.display}.source", il)
            except (TypeError, OSError, ValueError) as error:
                raise NNsightError(f"cannot show the source of what {op.path} calls ({f!r}): {error}") from error
            self._drilled[op.name] = cached = (key, listing, new_fn)
        self._in_use[op.name] = il.epoch
        return cached[1]

    def __getattr__(self, name: str) -> Any:
        import difflib

        near = difflib.get_close_matches(name, list(self.__dict__.get("line_numbers", {})), n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise AttributeError(f"{self.__dict__.get('path')} has no operation {name!r}.{hint}")

    def __iter__(self) -> Iterator[OperationEnvoy]:
        """The operations, in naming order (nnsight's ``for op in envoy.source``)."""
        return iter(self.operations)

    def __str__(self) -> str:
        return format_source(self.source, self.line_numbers)

    __repr__ = __str__


def _callable(f: Any, path: str) -> Callable:
    """The Python function (or bound method) behind the callable an operation calls."""
    if isinstance(f, torch.nn.Module):
        raise NNsightError(
            f"{path} calls a module ({type(f).__name__}): use `.source` of that module's envoy instead"
        )
    if not isinstance(f, (types.FunctionType, types.MethodType)) and isinstance(
        getattr(type(f), "__call__", None), types.FunctionType
    ):
        return f.__call__  # a callable object: its Python source is its __call__
    return f
