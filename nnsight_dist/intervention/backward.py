"""Gradient locations: a backward pass run as visits of ``<location>.grad``.

``with loss.backward():`` in a trace body runs a real backward pass *interleaved* with
the block's body, exactly as the forward is interleaved with a trace body: the block is a
mediator, and the gradient of every tensor it asks for is a *location*, visited once when
autograd produces that gradient. Reading ``h.grad`` in the block parks the block until the
visit (``h.grad.save()`` keeps it); assigning ``h.grad = g`` replaces the gradient that
flows on upstream, so the gradients of everything computed before ``h`` change.

A gradient location is named after where its tensor came from: a value served from
``model.model.layers.1.output`` has the gradient location
``model.model.layers.1.output.grad`` (``...output[i].grad`` for the i-th tensor of a tuple
or ``ModelOutput``). :class:`Origins` remembers, during a run, which location (and which
full-batch tensor, and rows) each served tensor came from; a tensor the body computed
itself, or a parameter, gets ``<tensor k>.grad``, k counting the pass's unnamed tensors.
A whole copy of a parameter the engine holds in fragments stands for the parameter
(:meth:`Origins.alias`); the seam gives such a gradient a codec
(:meth:`.seam.Seam.gradient_codec`), so it is served whole and written back as a fragment.
The visit comes from a tensor hook (a real PyTorch hook) registered on the first request:
on the tensor itself, or for an invoke's rows of a batched value, on the full-batch tensor
the model continued with; the hook passes the gradient through the interleaver's one
primitive, ``handle(location, gradient)``. The pass itself is started through the seam
(:meth:`.seam.Seam.backward`), which in one process just runs it. A gradient another rank
computes (:meth:`.seam.Seam.gradient`: the gradient of a value of another pipeline stage)
is hooked nowhere here: it is requested like any remote value, and its owner serves it.

Order rules (nnsight 0.8.1's): gradients arrive in the reverse of the forward order, so a
block asks for them from the last layer back. A gradient requested after its visit, or of
a tensor the backward never reaches (a slice taken in the body, ``output[:, -1]``, is not
what the model continued with) is an ``OutOfOrderError`` once the backward pass is over;
so is a forward location asked for inside the block (at once when it has passed). Outside a block ``.grad`` is torch's
own (``None`` and torch's warning for a non-leaf, unless ``retain_grad()`` was called).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from greenlet import GreenletExit, getcurrent

from .batcher import Group, tensors
from .errors import OutOfOrderError

if TYPE_CHECKING:
    from .interleaver import Interleaver
    from .sites import Site
    from .mediator import Mediator


class Origins:
    """Where the tensors served to bodies during a run came from.

    An entry per served tensor that autograd tracks: the location's name, the full-batch
    tensor the model continued with, and the rows (batch group) of it that were served
    (``None`` when the tensor served is that tensor itself). Entries hold weak references
    only; the interleaver starts a new ``Origins`` with every run.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, str, weakref.ref, Group]] = {}

    def record(self, location: str, whole: Any, served: Any, group: Group) -> None:
        """Remember that ``served`` (a tensor or a nest) was cut from ``whole`` at ``location``."""
        if isinstance(served, torch.Tensor):
            if served.requires_grad:
                self._add(served, location, whole, group)
            return
        parts = tensors(served)
        if not any(t.requires_grad for t in parts):
            return
        for i, (part, full) in enumerate(zip(parts, tensors(whole))):
            if part.requires_grad:
                self._add(part, f"{location}[{i}]", full, group)

    def alias(self, served: torch.Tensor, target: torch.Tensor) -> None:
        """Remember that ``served`` stands for ``target`` (a whole copy of a parameter the
        engine holds in fragments): ``served.grad`` is ``target``'s gradient, unnamed."""
        if served.requires_grad:
            self.entries[id(served)] = (weakref.ref(served), None, weakref.ref(target), None)

    def _add(self, served: torch.Tensor, location: str, whole: torch.Tensor, group: Group) -> None:
        rows = None if served is whole else group
        self.entries[id(served)] = (weakref.ref(served), location, weakref.ref(whole), rows)

    def of(self, tensor: torch.Tensor) -> Optional[tuple[Optional[str], torch.Tensor, Group]]:
        """``(location, full-batch tensor, rows)`` of a served tensor (location ``None`` for
        an alias), else ``None``."""
        entry = self.entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        whole = entry[2]()
        if whole is None:
            return None
        return entry[1], whole, entry[3]


class BackwardPass:
    """One ``with tensor.backward(...):`` block: a backward pass and the block's mediator.

    ``block`` is the block's mediator, ``outer`` the mediator whose body opened the block
    (it is running: the pass runs inside its turn, while the model stands still), and
    ``backward()`` starts the real backward pass. Call :meth:`run` once.
    """

    def __init__(self, interleaver: "Interleaver", block: "Mediator", outer: "Mediator",
                 backward: Callable[[], None]) -> None:
        self.interleaver = interleaver
        self.block = block
        self.outer = outer
        self.backward = backward
        #: Gradient location of each (hooked tensor id, rows) asked for in this pass.
        self.locations: dict[tuple[int, Group], str] = {}
        self.sites: list[str] = []
        self.handles: list[Any] = []
        self.unnamed = 0

    # ------------------------------------------------------------------ driving

    def run(self) -> None:
        """Run the backward pass with the block interleaved; the block's errors propagate.

        The block's mediator parks back to the greenlet running the pass (the outer body's),
        so the interleaver's driving greenlet is that one for the duration of the pass, and
        no forward visit is in progress (a forward location asked for inside the block has
        passed, or never comes before the pass ends). Autograd runs single-threaded: every
        hook fires on this thread, where greenlets can switch.
        """
        il = self.interleaver
        block, outer = self.block, self.outer
        saved = il.main, il.location, il.value
        il.main, il.location, il.value = getcurrent(), None, None
        block.index, block.seq = outer.index, outer.seq
        try:
            with _grad_property(self):
                il.start(block)
                # Run even when the block has ended already: the pass accumulates into the
                # parameters' ``.grad`` and frees the graph, as a plain backward does.
                with torch.autograd.set_multithreading_enabled(False):
                    il.seam.backward(self.backward)
                self._dangling()
        finally:
            if block.greenlet is not None and not block.greenlet.dead:
                il._unpark(block)
                block.greenlet.throw(GreenletExit())
            for handle in self.handles:
                handle.remove()
            for location in self.sites:
                il.sites.pop(location, None)
                il.seam.codecs.pop(location, None)
            outer.seq = block.seq
            il.main, il.location, il.value = saved

    def _dangling(self) -> None:
        """The backward pass is over: a block still waiting gets an ``OutOfOrderError``."""
        il, block = self.interleaver, self.block
        error: Optional[BaseException] = None
        while block.greenlet is not None and not block.greenlet.dead and block.wait is not None:
            wait = block.wait
            il._unpark(block)
            # A block that catches the error and waits again ends quietly.
            error = GreenletExit() if error is not None else OutOfOrderError(_passed(wait.location))
            il._resume(block, None, error)

    # ------------------------------------------------------------------ gradient locations

    def location(self, tensor: torch.Tensor) -> str:
        """The gradient location of ``tensor`` in this pass; hooks it at the first ask."""
        origin = self.interleaver.origins.of(tensor)
        name, target, rows = (None, tensor, None) if origin is None else origin
        key = (id(target), rows)
        location = self.locations.get(key)
        if location is not None:
            return location
        if name is None:
            self.unnamed += 1
            name = f"<tensor {self.unnamed}>"
        location = name + ".grad"
        if location in self.sites:
            # Another tensor of the same location: another visit's, or other rows of it.
            location = f"{location}#{len(self.sites)}"
        site = self._site(location)
        codec = self.interleaver.seam.gradient_codec(target)
        if codec is not None:  # a gradient the engine holds in fragments: served whole
            self.interleaver.seam.codecs[location] = codec
        if not self.interleaver.seam.gradient(location, None if origin is None else name, target):
            # A tensor autograd does not track is refused here by torch (as in nnsight 0.8.1).
            self.handles.append(target.register_hook(self._hook(location, site, rows)))
        self.locations[key] = location
        return location

    def _site(self, location: str) -> "Site":
        il = self.interleaver
        site = il._new_site(location)
        site.epoch, site.step, site.n = il.epoch, il.step, 0
        self.sites.append(location)
        return site

    def _hook(self, location: str, site: "Site", rows: Group) -> Callable[[torch.Tensor], torch.Tensor]:
        il = self.interleaver

        # ``guarded``: on many ranks an error fails the run and the pass goes on unchanged,
        # so that every rank runs its backward (and the engine's collectives in it) to the end.
        def visit(grad: torch.Tensor) -> torch.Tensor:
            if rows is None:
                value = il.guarded(location, grad, site)
                site.n += 1
                return value
            part = grad.narrow(0, rows[0], rows[1])
            value = il.guarded(location, part, site)
            site.n += 1
            # A read (in-place edits included) leaves ``part`` a view of ``grad``.
            return grad if value is part else il.batcher.swap(grad, value, rows, location)

        return visit

    def read(self, tensor: torch.Tensor) -> Any:
        """``tensor.grad`` in the block: its gradient, once the backward pass reaches it."""
        return self.interleaver.request(self.location(tensor))

    def write(self, tensor: torch.Tensor, value: Any) -> None:
        """``tensor.grad = value`` in the block: the gradient flowing on upstream."""
        self.interleaver.swap(self.location(tensor), value)


def _passed(location: str) -> str:
    return (
        f"{location} was requested but the backward pass had already passed it, or never "
        "reached it. Gradients arrive in the reverse of the forward order: ask for them from "
        "the last location back. Only values the model continued with receive one (read "
        "`.grad` of a layer's output and slice the gradient, not of a slice taken in the "
        "body), and only `.grad` is available inside a backward block: read `.output` / "
        "`.input` before it."
    )


@contextlib.contextmanager
def _grad_property(backward: BackwardPass) -> Iterator[None]:
    """``Tensor.grad`` as gradient locations of ``backward`` for its block's greenlet.

    Everyone else (torch, the outer body, other code) gets the property that was there
    before, so ``.grad`` keeps its meaning outside the block.
    """
    owned = "grad" in torch.Tensor.__dict__
    previous = inspect.getattr_static(torch.Tensor, "grad")
    block = backward.block

    def getter(tensor: torch.Tensor) -> Any:
        if getcurrent() is not block.greenlet:
            return previous.__get__(tensor, type(tensor))
        return backward.read(tensor)

    def setter(tensor: torch.Tensor, value: Any) -> None:
        if getcurrent() is not block.greenlet:
            previous.__set__(tensor, value)
            return
        backward.write(tensor, value)

    def deleter(tensor: torch.Tensor) -> None:
        previous.__delete__(tensor)

    torch.Tensor.grad = property(getter, setter, deleter, previous.__doc__)
    try:
        yield
    finally:
        if owned:
            torch.Tensor.grad = previous
        else:
            del torch.Tensor.grad
