"""``save``: mark a value to outlive its trace.

Names bound inside a trace body are dropped when the block ends, except those whose value
was saved: ``h = model.layer.output.save()`` or ``steps = nd.save([])``. A saved value is
registered with the innermost running trace, which writes the saved names back into the
caller's scope when the block ends.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Saved objects of each running trace (innermost last), keyed by id.
_REGISTRIES: list[dict[int, Any]] = []


def save(obj: T) -> T:
    """Keep ``obj`` after the trace; returns ``obj`` itself. Outside a trace it is a no-op.

    Registered with every running trace and session (not only the innermost), so a value
    saved in a trace inside ``model.session()`` also outlives the session.
    """
    for registry in _REGISTRIES:
        registry[id(obj)] = obj
    return obj


def save_any(obj: T) -> T:
    """What ``obj.save()`` means in a trace body (captured bodies call this instead).

    A class that defines a ``save`` of its own (other than nnsight_dist's, and other than
    one mounted on ``object`` by another library) keeps it: ``obj.save()`` calls it.
    Everything else is saved with :func:`save`, so ``[].save()`` or ``(3).save()`` work
    like in nnsight without a ``save`` attribute on every object.
    """
    for klass in type(obj).__mro__[:-1]:
        method = klass.__dict__.get("save")
        if method is not None:
            if getattr(method, "_nnsight_dist", False):
                break
            return obj.save()
    return save(obj)


def _method_save(self: T) -> T:
    """Keep this value after the trace (``value.save()``); returns the value."""
    return save(self)


_method_save._nnsight_dist = True


def add_save_method(cls: type) -> None:
    """Give instances of ``cls`` a ``.save()`` method (tensors, model outputs).

    Outside an nnsight_dist trace the call goes to whatever ``save`` the class had before
    (another library's, nnsight's for instance), so both can live in one process.
    """
    if getattr(cls.__dict__.get("save"), "_nnsight_dist", False):
        return
    previous = getattr(cls, "save", None)

    def method(self):
        if _REGISTRIES:
            return save(self)
        # A save installed before us, or later on a base class (nnsight mounts one on object).
        other = previous or next((k.__dict__["save"] for k in cls.__mro__[1:] if "save" in k.__dict__), None)
        return save(self) if other is None else other(self)

    method.__doc__ = _method_save.__doc__
    method._nnsight_dist = True
    cls.save = method


class SaveableTuple(tuple):
    """A tuple served to a body, with ``.save()`` like a tensor."""

    save = _method_save


class SaveableList(list):
    """A list served to a body, with ``.save()`` like a tensor."""

    save = _method_save


class SaveableDict(dict):
    """A dict served to a body, with ``.save()`` like a tensor."""

    save = _method_save


_SAVEABLE = {tuple: SaveableTuple, list: SaveableList, dict: SaveableDict}


def saveable(value: Any) -> Any:
    """``value``, as a type with ``.save()`` when it is a plain tuple, list or dict."""
    cls = _SAVEABLE.get(type(value))
    return value if cls is None else cls(value)


add_save_method(torch.Tensor)
