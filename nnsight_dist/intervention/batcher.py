"""The batcher: which rows of a served value belong to which mediator.

Several invokes are batched into one forward. Each mediator owns a *batch group*, a
``(start, size)`` range of rows; ``None`` means the whole batch. The batcher narrows a
value to a group's rows (a view, so in-place edits reach the model) and merges a
replacement for a group back into the full-batch value. Values are arbitrary nests of
tuples, lists, dicts and ``ModelOutput``s; only tensors whose first dimension is the
batch size are cut.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .errors import WriteShapeError

Group = Optional[tuple[int, int]]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return rebuild(value, lambda _, part: map_tensors(part, fn))


def rebuild(value: Any, apply: Callable[[Any, Any], Any]) -> Any:
    """``value`` (a tuple, list or mapping) with each part ``p`` under index or key ``k``
    replaced by ``apply(k, p)``: the same object when nothing changed, else one of the same
    type (named tuples and ``ModelOutput``s included). Other values are returned as they are."""
    if isinstance(value, (list, tuple)):
        items = [apply(i, v) for i, v in enumerate(value)]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        mapped = {k: apply(k, v) for k, v in value.items()}
        if all(mapped[k] is v for k, v in value.items()):
            return value
        if type(value) is dict:
            return mapped
        try:
            return type(value)(**mapped)
        except TypeError:
            return mapped
    return value


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest, in a fixed (depth-first) order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


class Batcher:
    """Cuts values by batch group and merges replacements back.

    ``total`` is the batch size of the traced forward (``None`` when unknown: then every
    group sees the whole value). With ``strict`` off (a scan), a replacement of the whole
    batch may change the value's shape, as in nnsight; the model then propagates it.
    """

    def __init__(self, total: Optional[int] = None, strict: bool = True) -> None:
        self.total = total
        self.strict = strict

    def whole(self, group: Group) -> bool:
        """True when ``group`` covers every row (no cutting needed)."""
        return group is None or self.total is None or (group[0] == 0 and group[1] == self.total)

    def narrow(self, value: Any, group: Group) -> Any:
        """The rows of ``group`` in ``value``, as views."""
        if self.whole(group):
            return value
        start, size = group
        total = self.total

        def cut(t: torch.Tensor) -> torch.Tensor:
            if t.dim() and t.shape[0] == total:
                return t.narrow(0, start, size)
            return t

        return map_tensors(value, cut)

    def swap(self, current: Any, new: Any, group: Group, location: str) -> Any:
        """``current`` with ``group``'s rows replaced by ``new``.

        Raises :class:`WriteShapeError` when a tensor of ``new`` does not have the shape
        of the value it replaces (unless not ``strict`` and ``group`` is the whole batch).
        """
        if self.whole(group) and not self.strict:
            return new
        old = self.narrow(current, group)
        _check_shapes(old, new, location)
        if self.whole(group):
            return new
        start, size = group
        olds, news = tensors(current), tensors(new)
        if len(olds) != len(news):
            raise WriteShapeError(
                f"cannot replace {location} for one invoke: the replacement has "
                f"{len(news)} tensors where the value has {len(olds)}"
            )
        replacement = iter(news)
        total = self.total

        def merge(t: torch.Tensor) -> torch.Tensor:
            piece = next(replacement)
            if t.dim() and t.shape[0] == total:
                return torch.cat([t[:start], piece.to(t.dtype), t[start + size :]])
            return piece

        return map_tensors(current, merge)


def _check_shapes(old: Any, new: Any, location: str) -> None:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        if old.shape != new.shape:
            raise WriteShapeError(
                f"cannot write {location}: the replacement has shape {tuple(new.shape)} "
                f"but the value it replaces has shape {tuple(old.shape)}"
            )
    elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        for a, b in zip(old, new):
            _check_shapes(a, b, location)
