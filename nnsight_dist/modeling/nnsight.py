"""``nd.NNsight(module)``: any torch module, traceable.

The root of an Envoy tree plus the entry points: ``trace``, ``scan``, ``session``,
``edit`` and ``clear_edits``. It also says how inputs are prepared and batched: here, positional
tensors of several invokes are concatenated along the first dimension. Subclasses
(:class:`~nnsight_dist.modeling.language_model.LanguageModel`) batch prompts instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..intervention.envoy import Envoy, EnvoyClasses, Rename
from ..tracing.tracer import EditingTracer, InterleavingTracer, ScanningTracer, Session

Batched = tuple[tuple, dict, list[Optional[tuple[int, int]]], Optional[int]]


class NNsight(Envoy):
    """A traceable wrapper of ``module`` (see the module docstring)."""

    def __init__(
        self, module: torch.nn.Module, *, rename: Optional[Rename] = None, envoys: Optional[EnvoyClasses] = None
    ) -> None:
        """``envoys``: the Envoy subclass of every module below the root, or a dict from
        module type or path suffix to one (see :func:`~..intervention.envoy.envoy_class`)."""
        super().__init__(module, None, "model", rename, envoys)
        self.__dict__["_edits"] = []

    # ------------------------------------------------------------------ entry points

    def trace(self, *inputs: Any, **kwargs: Any) -> InterleavingTracer:
        """A tracer running the model once on ``inputs`` (and its invokes' inputs)."""
        return InterleavingTracer(self, self._forward, inputs, kwargs)

    def scan(self, *inputs: Any, **kwargs: Any) -> ScanningTracer:
        """Like :meth:`trace`, on fake tensors: shapes and dtypes without computation."""
        return ScanningTracer(self, self._forward, inputs, kwargs)

    def session(self) -> Session:
        """A block whose traces run in turn and pass values to each other; only saved
        values outlive it."""
        return Session()

    def edit(self, *, inplace: bool = False) -> EditingTracer:
        """A block whose body becomes a default intervention of later traces.

        With ``inplace=False`` the edits apply to the returned copy only (``as edited``);
        the model itself is unchanged.
        """
        target = self if inplace else self._copy()
        return EditingTracer(target)

    def clear_edits(self) -> None:
        """Forget every edit made with :meth:`edit` on this object."""
        self._edits.clear()

    def _copy(self) -> "NNsight":
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__["_edits"] = list(self._edits)
        return copy

    def _edit_bodies(self) -> list[Callable[[], Any]]:
        return list(self._edits)

    # ------------------------------------------------------------------ inputs

    def _batch(self, inputs: list[tuple[tuple, dict]]) -> Batched:
        """Batch the inputs of the trace and its invokes into one call.

        Returns ``(args, kwargs, groups, total)``: the call's arguments, each input's
        ``(start, size)`` rows (``None`` for an invoke without inputs: the whole batch)
        and the total batch size.
        """
        given = [(a, k) for a, k in inputs if a or k]
        if len(given) == 1:
            args, kwargs = given[0]
            total = _rows(args, kwargs)
            return args, kwargs, [(0, total) if (a or k) else None for a, k in inputs], total
        groups: list[Optional[tuple[int, int]]] = []
        start = 0
        for a, k in inputs:
            if not (a or k):
                groups.append(None)
                continue
            n = _rows(a, k)
            groups.append((start, n))
            start += n
        columns = list(zip(*[a for a, k in given]))
        args = tuple(torch.cat(col) if isinstance(col[0], torch.Tensor) else col[0] for col in columns)
        kwargs = {
            key: torch.cat([k[key] for _, k in given]) if isinstance(v, torch.Tensor) else v
            for key, v in given[0][1].items()
        }
        return args, kwargs, groups, start

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        return self._module(*args, **kwargs)


def _rows(args: tuple, kwargs: dict) -> Optional[int]:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return None
