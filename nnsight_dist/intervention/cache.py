"""The cache: every visit of chosen modules recorded, keyed by full module path.

``tracer.cache(...)`` observes the input and/or output location of each chosen module
and stores what passes *after* the mediators have edited it. Keys are full paths
(``"model.model.layers.0.mlp"``); a :class:`CacheDict` also walks by attribute and index
(``cache.model.model.layers[0].output``). A module visited more than once (generation
steps) keeps a list, one value per visit; ``len(cache[path])`` counts the visits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .batcher import map_tensors


@dataclass
class Entry:
    """What was recorded for one module: ``output`` and ``inputs`` (``(args, kwargs)``).

    A module visited several times holds one value per visit: ``len(entry)`` is the number
    of visits, ``.output`` the list of values, ``entry[i]`` the entry of visit ``i``
    (nnsight 0.8.1 shows the same: ``len(cache[path])`` is the step count).
    """

    output: Optional[Any] = None
    inputs: Optional[Any] = None

    def __len__(self) -> int:
        recorded = [v for v in (self.output, self.inputs) if v is not None]
        return max((len(v) if isinstance(v, _Visits) else 1 for v in recorded), default=0)

    def __getitem__(self, visit: int) -> "Entry":
        n = len(self)
        if not -n <= visit < n:
            raise IndexError(f"visit {visit} of a module visited {n} time(s)")
        return Entry(*(v[visit] if isinstance(v, _Visits) else v for v in (self.output, self.inputs)))

    @property
    def input(self) -> Any:
        """The first positional argument (else the first keyword argument)."""
        if self.inputs is None:
            return None
        if isinstance(self.inputs, list):
            return [_first(i) for i in self.inputs]
        return _first(self.inputs)


def _first(inputs: Any) -> Any:
    args, kwargs = inputs
    return [*args, *kwargs.values()][0]


class CacheDict(dict):
    """A ``dict`` of path -> :class:`Entry` that can also be walked like the model."""

    def __init__(self, data: Optional[dict] = None, path: str = "") -> None:
        super().__init__(data or {})
        self._path = path
        self._root = self
        self._gather: Optional[Callable[[int], Any]] = None

    def gather(self, dst: int = 0) -> Optional["CacheDict"]:
        """A sharded cache (``tracer.cache(..., sharded=True)``) assembled whole on rank
        ``dst`` of the replica; ``None`` on the other ranks. Every rank must call it.
        A cache that is not sharded is returned as it is."""
        root = self._root
        return root if root._gather is None else root._gather(dst)

    def _at(self, path: str) -> "CacheDict":
        view = CacheDict.__new__(CacheDict)
        view._path = path
        view._root = self._root
        view._gather = None
        return view

    def _entry(self) -> Entry:
        root = self._root
        if self._path not in dict.keys(root):
            raise KeyError(f"{self._path!r} is not in the cache")
        return dict.__getitem__(root, self._path)

    def __len__(self) -> int:
        """Keys at the root; visits of the module at a path (like :class:`Entry`)."""
        return dict.__len__(self) if self is self._root else len(self._entry())

    @property
    def output(self) -> Any:
        return self._entry().output

    @property
    def inputs(self) -> Any:
        return self._entry().inputs

    @property
    def input(self) -> Any:
        return self._entry().input

    def __getattr__(self, name: str) -> "CacheDict":
        if name.startswith("_"):
            raise AttributeError(name)
        return self._at(f"{self._path}.{name}" if self._path else name)

    def __getitem__(self, key: Any) -> Any:
        root = self._root
        if self is root and isinstance(key, str) and dict.__contains__(root, key):
            return dict.__getitem__(root, key)
        path = f"{self._path}.{key}" if self._path else str(key)
        if dict.__contains__(root, path) and isinstance(key, str) and self is root:
            return dict.__getitem__(root, path)
        return self._at(path)


class Cache:
    """Records values into a :class:`CacheDict` (see the module docstring)."""

    def __init__(self, device: Any = "cpu", dtype: Optional[torch.dtype] = None, detach: bool = True) -> None:
        self.device = device
        self.dtype = dtype
        self.detach = detach
        self.cache = CacheDict()

    def recorder(self, path: str, key: str, narrow: Callable[[Any], Any]) -> Callable[[Any, int], None]:
        """An observer storing ``narrow(value)`` as ``key`` (``"output"``/``"inputs"``) of ``path``."""

        def record(value: Any, visit: int) -> None:
            self.add(path, key, narrow(value))

        return record

    def add(self, path: str, key: str, value: Any) -> None:
        """Store ``value`` (converted per the cache's options) under ``path``."""
        value = map_tensors(value, self._convert)
        entry = dict.get(self.cache, path)
        if entry is None:
            entry = Entry()
            dict.__setitem__(self.cache, path, entry)
        previous = getattr(entry, key)
        if previous is None:
            setattr(entry, key, value)
        elif isinstance(previous, _Visits):
            previous.append(value)
        else:
            setattr(entry, key, _Visits([previous, value]))

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        if self.detach:
            t = t.detach()
        if self.device is not None:
            t = t.to(self.device)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t


class _Visits(list):
    """Values of a module visited several times, one per visit."""
