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
    """Keep ``obj`` after the trace; returns ``obj`` itself. Outside a trace it is a no-op."""
    if _REGISTRIES:
        _REGISTRIES[-1][id(obj)] = obj
    return obj


def _tensor_save(self: torch.Tensor) -> torch.Tensor:
    """Keep this tensor after the trace (``tensor.save()``); returns the tensor."""
    return save(self)


torch.Tensor.save = _tensor_save
