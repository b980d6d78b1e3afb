"""Placement: what a location's value is on its owner, and how to make it whole.

An engine describes, per module, its *owner stage* (the pipeline stage that computes it;
``None`` when every stage does) and the tensor-parallel placement of its input and
output. A placement is a string:

- ``"whole"``; ``"shard(d)"`` (each rank of the stage holds a slice along dimension
  ``d``); ``"partial"`` (each holds a term of a sum not yet reduced); ``"local"`` (a
  fragment of a layout the engine does not describe, which is refused);
- per element, for values made of parts: ``"(whole, shard(1))"`` for a tuple (element
  ``i`` has the ``i``-th placement; elements past the list are ``local``: a module that
  computes on fragments returns nothing else whole), ``"{name: p, ...}"`` for a mapping or
  a ``ModelOutput`` (unnamed fields are whole). A plain placement of an input applies to
  its first argument; a per-element one names arguments by position and keywords by name.

Fragmented placements get a codec: an all-gather (or all-reduce) makes the whole value,
and a slice (or whole-on-one-rank, zeros elsewhere) makes the fragment again. Both are
differentiable (:class:`_Gather`, :class:`_Cut`), with *whole gradients* on the whole side:
in a trace that calls backward, a whole value served to a body stays connected to the
engine's graph, its gradient is the whole gradient (the same on every rank of the group),
and the gradient of a fragment is this rank's part of it. So ``.grad`` hooks go on the
whole value, as in one process (:class:`~..intervention.backward.Origins` records it), not
on this rank's fragment: what they see is the whole gradient ``.grad`` must show, a write
reaches the engine as a fragment through the gather's backward, and the interleaver needs
no knowledge of fragments. The price is one all-gather per fragmented value served, in
backward (the cut's). ``local``
parts, and objects of the engine's *opaque* types (the key/value cache, which holds this
rank's heads) anywhere in a value, are served as :class:`Refused` stand-ins that raise
when used, and go back to the engine as they were.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from ..intervention.batcher import map_tensors, rebuild, tensors
from ..intervention.errors import NNsightError
from ..intervention.seam import Codec
from .failure import Failures
from .router import _shape_only

WHOLE = "whole"
PARTIAL = "partial"
#: A tensor-parallel fragment whose layout the engine does not describe: never served.
LOCAL = "local"

Key = Union[int, str]


def shard(dim: int) -> str:
    """The placement string of a slice along ``dim``."""
    return f"shard({dim})"


def shard_dim(placement: str) -> Optional[int]:
    """``d`` for ``"shard(d)"``, else ``None``."""
    if placement.startswith("shard(") and placement.endswith(")"):
        return int(placement[6:-1])
    return None


def tuple_of(*placements: str) -> str:
    """The placement of a tuple whose element ``i`` has ``placements[i]`` (later ones: local)."""
    return "(" + ", ".join(placements) + ")"


def mapping_of(parts: dict[Key, str]) -> str:
    """The placement of a mapping, a ``ModelOutput`` or an input (positions and keywords)
    whose named parts have these placements (the others: whole)."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in parts.items()) + "}"


@functools.lru_cache(maxsize=None)
def elements(placement: str) -> Optional[tuple[bool, dict[Key, str]]]:
    """``(is a tuple placement, {key: placement})`` of a per-element placement; ``None``
    for a plain one. Integer keys are positions, others names."""
    if not placement or placement[0] not in "({":
        return None
    inner = [p.strip() for p in re.split(r",\s*(?![^()]*\))", placement[1:-1]) if p.strip()]
    if placement[0] == "(":
        return True, dict(enumerate(inner))
    parts: dict[Key, str] = {}
    for item in inner:
        key, value = (s.strip() for s in item.split(":", 1))
        parts[int(key) if key.isdigit() else key] = value
    return False, parts


def fragmented(placement: str) -> bool:
    """Whether any part of a value with this placement differs between tensor-parallel ranks."""
    parts = elements(placement)
    return placement != WHOLE if parts is None else any(p != WHOLE for p in parts[1].values()) or parts[0]


@dataclass(frozen=True)
class Placement:
    """Where one module runs and what its input and output are on the ranks that hold it."""

    path: str
    owner_stage: Optional[int]
    ranks: tuple[int, ...]
    input: str = WHOLE
    output: str = WHOLE
    #: ``(name, placement)`` of each parameter the engine holds as a plain tensor fragment
    #: (a ``DTensor`` describes itself and is not listed): served whole when read.
    parameters: tuple[tuple[str, str], ...] = ()
    #: A module run on every pipeline stage whose input, on the stages after the first, is
    #: made of a placeholder's stand-in values (the rotary embedding is handed the hidden
    #: states only for their dtype): its input is refused, on every rank.
    stand_in_input: bool = False

    def __str__(self) -> str:
        stage = "every stage" if self.owner_stage is None else f"stage {self.owner_stage}"
        return f"{self.path}: {stage}, ranks {list(self.ranks)}, input {self.input}, output {self.output}"


class Refused:
    """Stands in for a tensor-parallel fragment whose layout the engine does not describe.

    Serving the fragment would show one rank's part as if it were the whole value; the
    stand-in raises :class:`NNsightError` naming the location at any use instead, and the
    engine gets its fragment back when the value returns to the model.
    """

    __slots__ = ("_where", "_local", "_why")

    def __init__(self, where: str, local: Any, why: Optional[str] = None) -> None:
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_local", local)
        object.__setattr__(self, "_why", why)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        where, why = object.__getattribute__(self, "_where"), object.__getattribute__(self, "_why")
        raise NNsightError(f"{where} {why}" if why else (
            f"{where} holds this rank's tensor-parallel fragment, and the engine does not say how the "
            "fragments form the whole value: it is not shown (use another part of the value, or trace "
            "with tp=1)"
        ))

    def __getattr__(self, name: str) -> Any:
        self._refuse()

    def __repr__(self) -> str:
        why = object.__getattribute__(self, "_why") or "is a tensor-parallel fragment"
        return f"<refused: {object.__getattribute__(self, '_where')} {why.split(':')[0]}>"

    __setattr__ = __getitem__ = __setitem__ = __iter__ = __len__ = __call__ = __bool__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = _refuse
    __eq__ = __lt__ = __gt__ = __neg__ = __float__ = __int__ = __index__ = _refuse
    __hash__ = None  # type: ignore[assignment]


def restored(value: Any) -> Any:
    """``value`` with every :class:`Refused` stand-in replaced by the fragment it hides."""
    if isinstance(value, Refused):
        return object.__getattribute__(value, "_local")
    return rebuild(value, lambda _, part: restored(part))


class LayoutCodec(Codec):
    """Whole ⇄ fragment for one location's placement over the stage's tp group.

    ``on_input`` codecs act on ``(args, kwargs)``. ``opaque`` types are objects that hold
    fragments wherever they appear (served as :class:`Refused`).
    """

    def __init__(self, placement: str, group: Any, tp: int, tp_rank: int, failures: Failures,
                 location: str, on_input: bool, opaque: tuple[type, ...] = ()) -> None:
        self.placement = placement
        self.parts = elements(placement)
        #: For a plain shard or partial placement: its dimension / whether partial.
        self.dim = shard_dim(placement) if self.parts is None else None
        self.partial = placement == PARTIAL
        self.group = group
        self.tp = tp
        self.tp_rank = tp_rank
        self.failures = failures
        self.location = location
        self.on_input = on_input
        self.opaque = opaque

    @property
    def name(self) -> str:
        """How a user reaches the value: ``<path>.inputs`` (``(args, kwargs)``) or ``<path>.output``."""
        return self.location + ("s" if self.on_input else "")

    @property
    def plain_fragment(self) -> bool:
        """A plain sharded or partial output (one tensor per visit, for batched gathering)."""
        return not self.on_input and (self.dim is not None or self.partial)

    def whole(self, local: Any) -> Any:
        return self._walk(local, True)

    def fragment(self, whole: Any) -> Any:
        return self._walk(restored(whole), False)

    # ------------------------------------------------------------------ structure

    def _walk(self, value: Any, gather: bool) -> Any:
        """Apply each part's placement (``gather``: make it whole; else cut it again)."""
        def one(placement: str, where: str) -> Callable[[Any], Any]:
            return lambda t: self._one(t, placement, where, gather)

        if self.parts is None and self.placement == WHOLE:
            pass  # only opaque objects to hide
        elif self.parts is None:
            if self.on_input:
                value = _first_argument(value, one(self.placement, f"{self.location} (first argument)"))
            else:
                value = one(self.placement, self.location)(value)
        else:
            tuple_form, parts = self.parts
            default = LOCAL if tuple_form else WHOLE
            if self.on_input:
                args, kwargs = value
                args = rebuild(args, lambda i, v: one(parts.get(i, WHOLE), f"{self.name}[0][{i}]")(v))
                kwargs = rebuild(kwargs, lambda k, v: one(parts.get(k, WHOLE), f"{self.name}[1][{k!r}]")(v))
                value = (args, kwargs)
            elif isinstance(value, (tuple, list, dict)):
                value = rebuild(value, lambda k, v: one(parts.get(k, default), f"{self.location}[{k!r}]")(v))
            else:
                value = one(parts.get(0, WHOLE), self.location)(value)
        if gather:
            value = map_tensors(value, _editable)
            if self.opaque:
                value = self._hide_opaque(value, self.name)
        return value

    def _hide_opaque(self, value: Any, where: str) -> Any:
        if isinstance(value, self.opaque):
            return Refused(where, value)
        if isinstance(value, Refused):
            return value
        return rebuild(value, lambda k, v: self._hide_opaque(v, f"{where}[{k!r}]"))

    def _one(self, t: Any, placement: str, where: str, gather: bool) -> Any:
        if placement == WHOLE or t is None:
            return t
        if placement == LOCAL:
            return Refused(where, t) if gather else t
        if not isinstance(t, torch.Tensor):
            return t
        dim = shard_dim(placement)
        if gather:
            return self._gather(t, dim, placement == PARTIAL, where)
        return self._cut(t, dim, placement == PARTIAL)

    # ------------------------------------------------------------------ tensors

    def _gather(self, t: torch.Tensor, dim: Optional[int], partial: bool, where: str) -> torch.Tensor:
        if _shape_only(t):
            # A scan: the whole value's shape, without communication.
            return t if partial else torch.cat([t] * self.tp, dim=dim)
        return _Gather.apply(t, self, dim, partial, where)

    def _cut(self, t: torch.Tensor, dim: Optional[int], partial: bool) -> torch.Tensor:
        return _Cut.apply(t, self, dim, partial)

    def collect(self, t: torch.Tensor, dim: Optional[int], partial: bool, where: str,
                engine: bool = False) -> torch.Tensor:
        """The whole tensor from every rank's fragment ``t``: a sum (``partial``) or the
        concatenation along ``dim``; a collective of the tp group, ledgered by ``failures``
        (``engine``: completed on every rank also after a failure, see
        :meth:`.Failures.all_gather`)."""
        t = t.contiguous()
        if partial:
            out = t.clone()
            self.failures.all_reduce(out, self.group, f"the all-reduce of {where}", "its tensor-parallel group")
            return out
        parts = [torch.empty_like(t) for _ in range(self.tp)]
        self.failures.all_gather(parts, t, self.group, f"the all-gather of {where}", "its tensor-parallel group",
                                 engine)
        return torch.cat(parts, dim=dim)

    def part(self, t: torch.Tensor, dim: Optional[int], partial: bool) -> torch.Tensor:
        """This rank's fragment of the whole tensor ``t`` (a new tensor, never a view of ``t``:
        an autograd function must not return a view of its input, and the engine must not
        continue with a tensor that aliases the whole value a body may have saved)."""
        if partial:
            return t.clone() if self.tp_rank == 0 else torch.zeros_like(t)
        size, rest = divmod(t.shape[dim], self.tp)
        if rest:
            # The engine's layer holds one of tp equal slices: a whole value of another width
            # is one the unsharded layer refuses too (a shape mismatch), never cut short.
            raise RuntimeError(f"{self.location}: a value of size {t.shape[dim]} along dimension {dim} does not "
                               f"split into {self.tp} equal tensor-parallel slices: it is not the width this "
                               "layer takes (one process would fail on the shape too)")
        # Contiguous: engines reshape their fragments with .view().
        return t.narrow(dim, self.tp_rank * size, size).clone(memory_format=torch.contiguous_format)


class _Gather(torch.autograd.Function):
    """Whole value from fragments, differentiable; the gradient of a fragment from the whole
    gradient, which every rank of the group holds (the ranks compute the same whole-value
    side, SPMD): a shard's gradient is its slice of it, a partial term's is all of it (the
    whole is the sum of the terms). No collective in backward."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, codec: LayoutCodec, dim: Optional[int], partial: bool,
                where: str) -> torch.Tensor:
        ctx.codec, ctx.dim, ctx.partial = codec, dim, partial
        return codec.collect(t, dim, partial, where)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        whole = grad if ctx.partial else ctx.codec.part(grad, ctx.dim, False)
        return whole, None, None, None, None


class _Cut(torch.autograd.Function):
    """This rank's fragment of a whole value (what the engine continues with), differentiable:
    the gradient of the whole value is whole. A shard's gradients are gathered from the
    ranks (an all-gather in backward, the ranks reach it in the same order; part of the
    backward pass, which every rank runs to its end, also after a failure, so it is
    completed as the engine's collectives are); a partial term's gradient is already the
    whole gradient on every rank (the engine's reduction of the terms gives each term the
    gradient of their sum)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, codec: LayoutCodec, dim: Optional[int], partial: bool) -> torch.Tensor:
        ctx.codec, ctx.dim, ctx.partial = codec, dim, partial
        return codec.part(t, dim, partial)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        codec = ctx.codec
        whole = grad if ctx.partial else codec.collect(grad, ctx.dim, False, f"the gradient of {codec.location}",
                                                       engine=True)
        return whole, None, None, None


class ParameterGradient(Codec):
    """The gradient of a tensor-parallel parameter (a ``DTensor``), served whole.

    Each rank holds its shard of the gradient (``Shard(d)`` on one dimension of the
    engine's mesh, the tensor-parallel one); the whole gradient is the same on every rank
    of the group (an all-gather through ``layout``, ledgered and guarded like a value's),
    and a written gradient goes back as this rank's shard, with the same placements."""

    def __init__(self, layout: LayoutCodec) -> None:
        self.layout = layout
        self.spec: Any = None

    def whole(self, local: Any) -> Any:
        shards = [p.dim for p in local.placements if p.is_shard()]
        if len(shards) > 1 or any(p.is_partial() for p in local.placements):
            raise NNsightError(f"{self.layout.location} has placements {local.placements}: only a gradient "
                               "sharded along one dimension is shown whole")
        self.spec = local, (shards[0] if shards else None)
        if not shards:
            return local.to_local()
        return self.layout.collect(local.to_local(), shards[0], False, self.layout.location)

    def fragment(self, whole: Any) -> Any:
        local, dim = self.spec
        part = whole if dim is None else self.layout.part(whole, dim, False)
        return type(local).from_local(part, local.device_mesh, local.placements, run_check=False,
                                      shape=local.shape, stride=local.stride())


def _editable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when autograd forbids editing it in place: a view made inside a
    custom autograd function (a ``DTensor.to_local()`` of the engine, in a trace that keeps
    its graph). The copy is what the model then continues with, so edits of the served
    value reach the model as they do in one process."""
    if t.requires_grad and t._is_view() and isinstance(t.grad_fn, torch.autograd.function.BackwardCFunction):
        return t.clone()
    return t


def _first_argument(value: tuple[tuple, dict], fn: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with ``fn`` applied to the first argument (positional, else keyword)."""
    args, kwargs = value
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    if not kwargs:
        return value
    first = next(iter(kwargs))
    return args, {**kwargs, first: fn(kwargs[first])}


def _first_value(value: tuple[tuple, dict]) -> Any:
    args, kwargs = value
    return args[0] if args else next(iter(kwargs.values()), None)


def assemble(values: list, placement: str, on_input: bool, where: str) -> Any:
    """One value of ``where`` from its owners' fragments, in tensor-parallel order (the
    first owner's when whole); ``local`` parts become :class:`Refused`."""
    def join(placement: str, at: str) -> Callable[[list], Any]:
        dim = shard_dim(placement)

        def fn(parts: list) -> Any:
            if placement == LOCAL:
                return Refused(at, None)
            if not isinstance(parts[0], torch.Tensor) or (dim is None and placement != PARTIAL):
                return parts[0]
            return sum(parts[1:], parts[0]) if placement == PARTIAL else torch.cat(parts, dim=dim)
        return fn

    parts = elements(placement)
    first = values[0]
    if parts is None:
        if not on_input:
            return join(placement, where)(values)
        whole = join(placement, where)([_first_value(v) for v in values])
        return _first_argument(first, lambda _: whole)
    tuple_form, table = parts
    default = LOCAL if tuple_form else WHOLE
    if on_input:
        args = tuple(join(table.get(i, WHOLE), f"{where} args[{i}]")([v[0][i] for v in values])
                     for i in range(len(first[0])))
        kwargs = {k: join(table.get(k, WHOLE), f"{where} {k!r}")([v[1][k] for v in values]) for k in first[1]}
        return args, kwargs
    if isinstance(first, (tuple, list, dict)):
        return rebuild(first, lambda k, _: join(table.get(k, default), f"{where}[{k!r}]")([v[k] for v in values]))
    return join(table.get(0, WHOLE), where)(values)


class Unplaced(Codec):
    """A location (an operation or a module inside a tensor-parallel module) whose value is a
    fragment of undescribed layout: serving it would show a shard as if it were whole."""

    def __init__(self, location: str, module: str) -> None:
        self.location = location
        self.module = module

    def whole(self, local: Any) -> Any:
        raise NNsightError(
            f"{self.location} is computed on this rank's tensor-parallel fragment in {self.module}, "
            "and the engine does not say how the fragments form the whole value: read the module's "
            "inputs and outputs (or its children's) instead, or trace with tp=1"
        )

    fragment = whole


class StandIn(Codec):
    """The inputs of a module run on every pipeline stage whose first argument later stages
    compute from a placeholder's stand-in values (:attr:`Placement.stand_in_input`): that
    argument is served as a :class:`Refused` stand-in on every rank (the others as they
    are); a written value goes to the model on every stage (each computed the same one)."""

    WHY = ("is, on the pipeline stages after the first, a placeholder's stand-in for values another stage "
           "computes (this module runs on every stage): it is not shown on any rank. Read the output of the "
           "module that computes it (the embedding's) instead, or trace with pp=1")

    def __init__(self, location: str) -> None:
        self.location = location

    def whole(self, local: Any) -> Any:
        # A scan's shapes pass: the stand-in values have the real ones.
        return _first_argument(local, lambda t: t if all(_shape_only(x) for x in tensors(t)) else
                               Refused(f"{self.location}s (first argument)", t, self.WHY))

    def fragment(self, whole: Any) -> Any:
        return restored(whole)


#: Module methods that list parameters as the module holds them (fragments included).
PARAMETER_LISTINGS = ("parameters", "named_parameters", "state_dict", "get_parameter")


def whole_parameter(value: Any, layout: Optional[Codec]) -> Any:
    """A parameter the engine holds as a plain tensor fragment (engines list no ``DTensor``:
    the envoy makes those whole), whole through ``layout``: a collective of the tp group."""
    if layout is None or not isinstance(value, torch.Tensor):
        return value
    return layout.whole(value.detach())


def holds_dtensor_shards(module: torch.nn.Module) -> bool:
    """Whether a parameter of ``module`` itself (not of its children) is a ``DTensor`` that
    is not replicated: its forward computes on this rank's fragment."""
    return any(not all(p.is_replicate() for p in param.placements)
               for param in module.parameters(recurse=False) if hasattr(param, "placements"))

