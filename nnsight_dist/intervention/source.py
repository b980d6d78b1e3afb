"""``.source``: the operations inside a module's forward, as envoys.

``envoy.source`` rewrites the module's forward once (:func:`.inject.inject`) so that each
call in its body is a call point of the interleaver, named like
``model.model.layers.0.self_attn.self_o_proj_0``. Printing an :class:`EnvoySource` lists
the forward's lines with the operation names; each operation is an
:class:`OperationEnvoy` with ``.output``, ``.inputs``, ``.input`` and ``.skip`` like a
module's envoy. Outside a trace the rewritten forward calls straight through.
"""

from __future__ import annotations

import inspect
from types import MethodType
from typing import TYPE_CHECKING, Any

from .envoy import Interventions
from .inject import format_operation, format_source, inject
from .interleaver import Interleaver

if TYPE_CHECKING:
    from .envoy import Envoy


class OperationEnvoy(Interventions):
    """One operation inside a forward: a location pair ``<path>.input`` / ``<path>.output``."""

    def __init__(self, path: str, name: str, source: str, line: int, interleaver: Interleaver) -> None:
        self.path = path
        self.name = name
        self.line = line
        self.interleaver = interleaver
        self._source = source

    def __str__(self) -> str:
        return format_operation(self.path, self._source, self.line)

    __repr__ = __str__


class EnvoySource:
    """The listing of a forward with one :class:`OperationEnvoy` attribute per operation."""

    def __init__(self, path: str, source: str, line_numbers: dict[str, int], interleaver: Interleaver) -> None:
        self.path = path
        self.source = source
        self.line_numbers = line_numbers
        self.operations: list[OperationEnvoy] = []
        for name, line in line_numbers.items():
            op = OperationEnvoy(f"{path}.{name}", name, source, line, interleaver)
            setattr(self, name, op)
            self.operations.append(op)

    @classmethod
    def of_module(cls, envoy: "Envoy") -> "EnvoySource":
        """Rewrite ``envoy``'s forward so its operations become call points."""
        point = envoy._point
        il = envoy.interleaver
        forward = point.forward
        calls: dict[str, Any] = {}
        source, lines, fn = inject(forward, envoy.path, lambda name, f, a, k: calls["call"](name, f, a, k))
        calls["call"] = il.operation(envoy.path, list(lines))
        il.seam.operations(envoy.path, list(lines))
        point.forward = MethodType(fn, forward.__self__) if inspect.ismethod(forward) else fn
        return cls(envoy.path, source, lines, il)

    def __getattr__(self, name: str) -> Any:
        import difflib

        near = difflib.get_close_matches(name, list(self.__dict__.get("line_numbers", {})), n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise AttributeError(f"{self.__dict__.get('path')} has no operation {name!r}.{hint}")

    def __str__(self) -> str:
        return format_source(self.source, self.line_numbers)

    __repr__ = __str__
