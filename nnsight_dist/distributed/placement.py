"""Placement: what a location's value is on its owner, and how to make it whole.

An engine describes, per module, its *owner stage* (the pipeline stage that computes it;
``None`` when every stage does) and the tensor-parallel placement of its input and
output: ``"whole"``, ``"shard(d)"`` (each rank of the stage holds a slice along
dimension ``d``), ``"partial"`` (each holds a term of a sum not yet reduced) or
``"local"`` (a fragment of a layout the engine does not describe, which is refused).
Fragmented placements get a codec: an all-gather (or all-reduce) makes the whole value,
and a slice (or whole-on-one-rank, zeros elsewhere) makes the fragment again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..intervention.seam import Codec
from .failure import Failures
from .router import _shape_only

WHOLE = "whole"
PARTIAL = "partial"
#: A tensor-parallel fragment whose layout the engine does not describe: never served.
LOCAL = "local"


def shard(dim: int) -> str:
    """The placement string of a slice along ``dim``."""
    return f"shard({dim})"


def shard_dim(placement: str) -> Optional[int]:
    """``d`` for ``"shard(d)"``, else ``None``."""
    if placement.startswith("shard(") and placement.endswith(")"):
        return int(placement[6:-1])
    return None


@dataclass(frozen=True)
class Placement:
    """Where one module runs and what its input and output are on the ranks that hold it."""

    path: str
    owner_stage: Optional[int]
    ranks: tuple[int, ...]
    input: str = WHOLE
    output: str = WHOLE

    def __str__(self) -> str:
        stage = "every stage" if self.owner_stage is None else f"stage {self.owner_stage}"
        return f"{self.path}: {stage}, ranks {list(self.ranks)}, input {self.input}, output {self.output}"


class TensorCodec(Codec):
    """Whole ⇄ fragment for one tensor-parallel placement over the stage's tp group.

    ``on_input`` codecs act on ``(args, kwargs)`` and transform the first argument only.
    """

    def __init__(self, placement: str, group: Any, tp: int, tp_rank: int, failures: Failures,
                 location: str, on_input: bool) -> None:
        self.dim = shard_dim(placement)
        self.partial = placement == PARTIAL
        self.group = group
        self.tp = tp
        self.tp_rank = tp_rank
        self.failures = failures
        self.location = location
        self.on_input = on_input

    def _apply(self, value: Any, fn) -> Any:
        if not self.on_input:
            return fn(value)
        args, kwargs = value
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: fn(kwargs[first])}

    def whole(self, local: Any) -> Any:
        return self._apply(local, self._gather)

    def fragment(self, whole: Any) -> Any:
        return self._apply(whole, self._cut)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            return t
        if _shape_only(t):
            # A scan: the whole value's shape, without communication.
            return t if self.partial else torch.cat([t] * self.tp, dim=self.dim)
        t = t.contiguous()
        if self.partial:
            out = t.clone()
            work = dist.all_reduce(out, group=self.group, async_op=True)
            self.failures.wait_work(work, f"the all-reduce of {self.location}", "its tensor-parallel group")
            return out
        parts = [torch.empty_like(t) for _ in range(self.tp)]
        work = dist.all_gather(parts, t, group=self.group, async_op=True)
        self.failures.wait_work(work, f"the all-gather of {self.location}", "its tensor-parallel group")
        return torch.cat(parts, dim=self.dim)

    def _cut(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            return t
        if self.partial:
            return t if self.tp_rank == 0 else torch.zeros_like(t)
        size = t.shape[self.dim] // self.tp
        # Contiguous: engines reshape their fragments with .view().
        return t.narrow(self.dim, self.tp_rank * size, size).contiguous()
