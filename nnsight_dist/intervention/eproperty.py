"""``eproperty``: the extension point for values that live in the running model.

An eproperty is a descriptor defined by decorating a stub method. Reading it inside a
trace *requests* the value at ``<obj.path>.<key>`` from the interleaver (parking the
mediator until the model gets there); assigning to it *swaps* a new value in. Three
hooks adapt the value:

- ``preprocess(obj, value)`` runs on the raw value before the user sees it;
- ``postprocess(obj, value)`` runs on a user's assignment before it is swapped in;
- ``transform(value)`` closes the loop for a preprocessed copy: the preprocessed value is
  bound into it, and when the body next asks the model for anything (or parks), its
  return value is swapped back into the model, so in-place edits on a reshaped or cloned
  view take effect. Until then, reading the same eproperty again gives the same view
  (``x.heads[:, 5] += f(x.heads)`` edits one tensor), as in nnsight.

The stub's body never runs for its value; it runs on every access (before the request)
so decorators stacked under ``@eproperty()`` can prepare what the access needs. Outside a
trace, an object may offer a recorded value instead (``_fake_<key>``, set by a scan).

nnsight 0.8.1's form works too: a stub taking the value, ``def heads(self, value)``, *is*
the preprocess (``@eproperty`` may then be written without parentheses), and a transform
taking three parameters is called as ``transform(self, view, raw)`` with the raw value.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

from .errors import NotTracingError
from .save import saveable


class eproperty:
    """A hookable property on an object with ``interleaver`` and ``path`` attributes."""

    def __init__(self, key: Any = None, description: Optional[str] = None, iterate: bool = True):
        self.key = None if callable(key) else key
        self.description = description
        self.iterate = iterate
        self._stub: Optional[Callable] = None
        self._preprocess: Optional[Callable] = None
        self._postprocess: Optional[Callable] = None
        self._transform: Optional[Callable] = None
        self._transform_raw = False
        if callable(key):  # bare ``@eproperty`` (nnsight's form): ``key`` is the stub
            self(key)

    def __call__(self, stub: Callable) -> "eproperty":
        if _positional(stub) >= 2:
            # nnsight's form: ``def name(self, value)`` is the preprocess itself.
            self._preprocess = stub
        else:
            self._stub = stub
        if self.key is None:
            self.key = stub.__name__
        self.__doc__ = stub.__doc__
        self.__name__ = stub.__name__
        return self

    def preprocess(self, fn: Callable[[Any, Any], Any]) -> "eproperty":
        """Register ``fn(obj, value)`` run on the value before the user sees it."""
        self._preprocess = fn
        return self

    def postprocess(self, fn: Callable[[Any, Any], Any]) -> "eproperty":
        """Register ``fn(obj, value)`` run on an assigned value before it is swapped in."""
        self._postprocess = fn
        return self

    def transform(self, fn: Callable[..., Any]) -> "eproperty":
        """Register ``fn(preprocessed_value)`` whose result is swapped back into the model.

        A function of three parameters is nnsight's form, called as
        ``fn(obj, preprocessed_value, raw_value)``.
        """
        self._transform = fn.__func__ if isinstance(fn, staticmethod) else fn
        self._transform_raw = not isinstance(fn, staticmethod) and _positional(fn) == 3
        return self

    def location(self, obj: Any) -> str:
        """The location string this property reads for ``obj``."""
        path = getattr(obj, "path", "")
        return f"{path}.{self.key}" if path else self.key

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self
        if self._stub is not None:
            self._stub(obj)
        interleaver = obj.interleaver
        location = self.location(obj)
        pending = _pending(interleaver)
        if pending is not None and pending.key == (self, obj, location, interleaver.current.iteration):
            return pending.view
        if interleaver is None or not interleaver.active:
            fake = getattr(obj, "_fakes", {}).get(self.key, _MISSING)
            if fake is not _MISSING:
                value = fake
            else:
                raise NotTracingError(
                    f"`.{self.__name__}` of {getattr(obj, 'path', obj)} is only available "
                    "inside a trace: read it in the body of `with model.trace(...)`, or run "
                    "`model.scan(...)` first to see shapes."
                )
        else:
            value = interleaver.request(location)
        if self._preprocess is None:
            return saveable(value)
        raw, value = value, self._preprocess(obj, value)
        shown = saveable(value)
        if self._transform is not None and interleaver is not None and interleaver.active:
            if self._transform_raw:
                transform = functools.partial(self._transform, obj, value, raw)
            else:
                transform = functools.partial(self._transform, value)
            key = (self, obj, location, interleaver.current.iteration)
            interleaver.set_transform(location, WriteBack(transform, shown, key))
        return shown

    def __set__(self, obj: Any, value: Any) -> None:
        interleaver = obj.interleaver
        if interleaver is None or not interleaver.active:
            raise NotTracingError(
                f"`.{self.__name__}` of {getattr(obj, 'path', obj)} can only be set inside a trace."
            )
        if self._postprocess is not None:
            value = self._postprocess(obj, value)
        interleaver.swap(self.location(obj), value)


_MISSING = object()


class WriteBack:
    """A pending transform: ``fn()`` is swapped in; ``view`` is what the body holds, handed
    out again by a repeated read matching ``key`` (eproperty, host, location, iteration)."""

    __slots__ = ("fn", "view", "key")

    def __init__(self, fn: Callable[[], Any], view: Any, key: tuple) -> None:
        self.fn, self.view, self.key = fn, view, key

    def __call__(self) -> Any:
        return self.fn()


def _pending(interleaver: Any) -> Optional[WriteBack]:
    """The current mediator's pending write-back, if any."""
    med = getattr(interleaver, "current", None) if interleaver is not None and interleaver.active else None
    transform = med.transform[1] if med is not None and med.transform is not None else None
    return transform if isinstance(transform, WriteBack) else None


def _positional(fn: Callable) -> int:
    """How many positional parameters ``fn`` declares."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
