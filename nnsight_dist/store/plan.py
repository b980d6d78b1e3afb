"""What a collection stores: the entries a list of module patterns names, and who writes them.

An *entry* is one module's output (named by its path relative to the model,
``model.layers.0.mlp``) or first input (``model.layers.0.mlp.input``). Patterns are
matched against those paths with shell-style wildcards (``model.layers.*.mlp``; a ``*``
does not cross a dot); a pattern that matches nothing, or names a module the store cannot
hold, is a :class:`~.format.StoreError` raised on every rank before any work (every rank
holds the whole module tree, so every rank finds the same error).

Who writes: the ranks of the entry's owner stage (stage 0 for modules every stage runs).
A value the engine keeps as a tensor-parallel shard along a feature dimension is written
by every rank of the stage, each its own shard, unless ``gather_tp``; every other value
is written whole, once per tensor-parallel group (by its rank 0), never once per rank.
Partial sums and shards along the batch or sequence are made whole before writing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..distributed.placement import WHOLE, elements, shard_dim
from .format import StoreError

INPUT_SUFFIX = ".input"


@dataclass
class Entry:
    """One stored entry and how this job writes it."""

    name: str  #: path relative to the model, with ``.input`` for an input
    module: str  #: the module's full path (``model.model.layers.0.mlp``)
    key: str  #: ``"output"`` or ``"input"``
    placement: str  #: the engine's placement of the stored element
    owner_stage: Optional[int]
    sharded: bool  #: written as one shard per tensor-parallel rank
    dim: Optional[int] = None  #: the shard dimension of the value (``[batch, seq, ...]``), when sharded

    @property
    def location(self) -> str:
        return f"{self.module}.{self.key}"

    @property
    def writer_stage(self) -> int:
        return self.owner_stage or 0

    def writes(self, pp_rank: int, tp_rank: int) -> bool:
        """Whether the rank at ``(pp_rank, tp_rank)`` of a replica writes this entry."""
        return pp_rank == self.writer_stage and (self.sharded or tp_rank == 0)

    def describe(self) -> dict:
        return {"module": self.module, "key": self.key, "placement": self.placement,
                "owner_stage": self.owner_stage, "sharded": self.sharded}


def resolve(model: Any, patterns: Any, include_inputs: bool, gather_tp: bool) -> list[Entry]:
    """The entries ``patterns`` name, in module order (see the module docstring)."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        patterns = [patterns]
    root = model.path + "."
    paths = [p[len(root):] for p, _ in model.named_modules() if p.startswith(root)]
    chosen: set[str] = set()
    for pattern in patterns:
        if hasattr(pattern, "path") and not isinstance(pattern, str):  # an envoy
            pattern = pattern.path
        if not isinstance(pattern, str) or not pattern:
            raise StoreError(f"modules must be paths or glob patterns (strings), got {pattern!r}")
        found = _matches(pattern, paths)
        if not found and pattern.startswith(root):  # a full path: "model.model.layers.*"
            found = _matches(pattern[len(root):], paths)
        if not found:
            near = sorted(paths, key=lambda p: -_common(p, pattern))[:3]
            raise StoreError(f"the module pattern {pattern!r} matches no module of the model (paths are relative "
                             f"to the model, e.g. {', '.join(repr(n) for n in near)}); nothing was collected")
        chosen.update(found)
    table = model.placements()
    entries = []
    for path in (p for p in paths if p in chosen):
        module = root + path
        for key in ("output", "input") if include_inputs else ("output",):
            placement = table[module].output if key == "output" else table[module].input
            entries.append(_entry(path + (INPUT_SUFFIX if key == "input" else ""), module, key,
                                  _first(placement, key), table[module].owner_stage, gather_tp))
    return entries


def _matches(pattern: str, paths: list[str]) -> list[str]:
    regex = re.compile(fnmatch.translate(pattern).replace(".*", "[^.]*"))
    return [p for p in paths if regex.fullmatch(p)]


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first(placement: str, key: str) -> str:
    """The placement of the stored element: a tuple output's first element, an input's first
    argument (see :mod:`..distributed.placement`)."""
    parts = elements(placement)
    if parts is None:
        return placement
    is_tuple, named = parts
    if is_tuple or key == "input":
        return named.get(0, WHOLE if not is_tuple else "local")
    return WHOLE  # a ModelOutput: its first field is stored, and unnamed fields are whole


def _entry(name: str, module: str, key: str, placement: str, owner: Optional[int], gather_tp: bool) -> Entry:
    if placement == "local":
        raise StoreError(f"{name}: the engine does not describe the layout of this value across tensor-parallel "
                         "ranks, so it cannot be stored (choose its parent or child module)")
    dim = shard_dim(placement)
    sharded = dim is not None and not gather_tp and (dim < 0 or dim >= 2)
    return Entry(name, module, key, placement, owner, sharded, dim if sharded else None)
