"""``with loss.backward():`` — the backward block of a trace body.

While a trace runs, ``Tensor.backward`` is ours: called as the context of a ``with``
statement in a trace body, it returns a :class:`BackwardBlock`, whose body is captured
like an invoke's and run as a :class:`..intervention.backward.BackwardPass` when the block
ends: the real backward pass, with the body reading and replacing ``.grad`` of the values
it holds as autograd reaches them. Called any other way (``loss.backward()`` as a
statement, or outside our traces) it is torch's own backward, untouched; ``retain_grad()``
and ``.grad`` after it are plain PyTorch. This is nnsight 0.8.1's behaviour, which patches
``Tensor.backward`` for good at import; ours is installed for the duration of a trace only
and calls torch's own function, so both libraries live in one process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from types import FrameType
from typing import Any, Iterator, Optional

import torch
from greenlet import getcurrent

from ..intervention.backward import BackwardPass
from ..intervention.errors import NoGradientError
from ..intervention.interleaver import Interleaver
from ..intervention.mediator import Mediator
from .capture import opens_with, push_names, scope
from .tracer import _Block

#: Torch's own ``Tensor.backward``, under any wrapper installed before us (nnsight's).
_TORCH_BACKWARD = inspect.unwrap(torch.Tensor.backward)

#: Interleavers of the traces running now (innermost last).
_RUNNING: list[Interleaver] = []


@contextlib.contextmanager
def backward_blocks(interleaver: Interleaver) -> Iterator[None]:
    """Make ``with t.backward():`` in the bodies of ``interleaver``'s trace a backward block."""
    previous = torch.Tensor.__dict__["backward"]
    _RUNNING.append(interleaver)
    torch.Tensor.backward = _backward
    try:
        yield
    finally:
        _RUNNING.pop()
        torch.Tensor.backward = previous


@functools.wraps(_TORCH_BACKWARD)
def _backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.backward`` during a trace: a :class:`BackwardBlock` when it opens a ``with``
    statement of a running body, else torch's backward."""
    il = _RUNNING[-1] if _RUNNING else None
    med = il.current if il is not None else None
    if med is not None and getcurrent() is med.greenlet:
        if opens_with(sys._getframe(1), "backward"):
            return BackwardBlock(il, tensor, args, kwargs)
        il.seam.check_plain_backward()
    return _TORCH_BACKWARD(tensor, *args, **kwargs)


class BackwardBlock(_Block):
    """``with tensor.backward(*args, **kwargs):`` inside a trace body (see module docstring)."""

    def __init__(self, interleaver: Interleaver, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self.interleaver = interleaver
        self.tensor = tensor
        self.args = args
        self.kwargs = kwargs

    def _check(self) -> None:
        if not self.tensor.requires_grad:
            raise NoGradientError(
                "backward() of a tensor that does not require grad: a backward block cannot "
                "produce gradients, nothing the block reads can ever receive one. The forward "
                "ran without gradient tracking (under torch.no_grad(), as `model.generate` does, "
                "and a distributed trace whose body does not itself call `.backward(`: write the "
                "block in the trace body, not in a function defined elsewhere), or the tensor was "
                "made without requires_grad=True."
            )

    def _run(self, roots: Optional[list] = None, grads: Optional[list] = None) -> None:
        """The block's backward: torch's, from the tensor; or, with ``roots``, from ``roots``
        with gradients ``grads`` and the block's options (see :meth:`..intervention.seam.Seam.backward`)."""
        if roots is None:
            _TORCH_BACKWARD(self.tensor, *self.args, **self.kwargs)
            return
        bound = inspect.signature(_TORCH_BACKWARD).bind(self.tensor, *self.args, **self.kwargs)
        bound.apply_defaults()
        options = bound.arguments
        torch.autograd.backward(roots, grads, retain_graph=options["retain_graph"],
                                create_graph=options["create_graph"])

    def _captured(self, frame: FrameType) -> None:
        il = self.interleaver
        outer = il.current
        sc = scope(frame)
        block = Mediator(self._body.bind(sc), None, f"backward block of {outer.name}")
        try:
            BackwardPass(il, block, outer, self._run).run()
        finally:
            # Into the enclosing body, saved or not; the trace keeps the saved ones at its end.
            push_names(frame, sc.writes())
