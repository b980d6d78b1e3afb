"""Backward across pipeline stages: one backward pass of a trace, run stage by stage.

Every stage runs the same body (SPMD), so every stage computes the loss; only on the last
stage is it the real one: the values it was computed from that other stages own are copies
that came over the router. In a trace that calls backward the router keeps autograd links
across stages (:attr:`.router.Router.graph`): a tensor that requires grad is remembered by
its sender, and arrives as a clone of a *leaf* that requires grad. The hidden states a stage
receives from the previous one are such tensors, and so is every copy of a value served
by another stage (a layer's output read in the body, an ad-hoc call's result, a parameter).

A backward pass (:meth:`PipelineBackward.run`, the seam's ``backward``) then goes:

1. the last stage runs autograd from the loss (``run()``); the body's gradient visits on it
   are served as they come and pushed to the other stages, like values;
2. every stage sends each earlier stage the gradients its leaves from that stage received
   (one ``("grads", pass, stage)`` message, raw tensors keyed by the message that brought
   each leaf) and tells the later stages that its part of the pass is over
   (``("gdone", pass, stage)``);
3. a stage before the last waits (router-aware) for the ``grads`` of every later stage and
   runs autograd from the tensors it had sent, with those gradients, in one call
   (``run(roots, grads)``), so each of its gradient visits sees the whole gradient once; then
   it does 2;
4. a stage returns once every earlier stage has said ``gdone``: its block may wait for
   gradients that earlier stages serve during their part, and the pass is over only when
   no stage can serve any more.

So a ``.grad`` write on the last stage changes the gradient of the hidden states it received,
which travels back and changes every gradient before it; the gradient of a location is
computed by its owner (:meth:`PipelineBackward.is_remote`) and reaches the other stages like a
value. See docs/design.md, "Backward across stages", for why it cannot deadlock.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..intervention.errors import NNsightError

if TYPE_CHECKING:
    from .replica import ReplicaSeam

_PART = re.compile(r"\[\d+\]$")


class PipelineBackward:
    """The backward passes of one rank's traces (see the module docstring)."""

    def __init__(self, seam: "ReplicaSeam") -> None:
        self.seam = seam
        self.passes = 0
        #: Gradient locations named in the current trace (forgotten when the next begins).
        self.named: set[str] = set()
        #: ``<module path>.<name>`` of each parameter read in the current trace -> its stage.
        self.parameters: dict[str, int] = {}
        #: Hooks of the pass in progress on copies of tensors the last stage serves (:meth:`_split`).
        self.detectors: list = []

    def begin(self, calls_backward: bool) -> None:
        """A trace starts: links across stages only if its body calls backward."""
        seam = self.seam
        seam.router.graph = calls_backward
        self.passes = 0
        for location in self.named:
            seam.owner.pop(location, None)
            seam.remote.discard(location)
        self.named = set()
        self.parameters = {}
        for handle in self.detectors:
            handle.remove()
        self.detectors = []

    def parameter(self, path: str, name: str, stage: int, value: Any) -> Any:
        """``value``, the attribute ``name`` of the module at ``path`` of ``stage``, read in
        the body: a tensor's gradient location is ``<path>.<name>.grad``, computed on
        ``stage``, whose tensor is the real one (on the others it is a copy)."""
        if isinstance(value, torch.Tensor):
            location = f"{path}.{name}"
            self.parameters[location] = stage
            origins = self.seam.interleaver.origins
            alias = origins.of(value)
            # A tensor-parallel parameter is read as a whole copy standing for it (an alias):
            # the gradient is the parameter's.
            target = alias[1] if alias is not None and alias[0] is None else value
            origins.record(location, target, value, None)
        return value

    def is_remote(self, location: str, of: Optional[str], tensor: Any) -> bool:
        """Give ``location``, the gradient location of ``tensor`` (served at ``of``), its
        owner stage, and say whether that is another stage (see
        :meth:`..intervention.seam.Seam.gradient`).

        The owner of ``of`` (for a parameter, its module's stage) computes it: its tensor is
        in the real graph. The gradient of a value no stage owns (the root's output,
        ``result``) or of a tensor the body computed comes from the last stage, the one
        whose loss is the real one. That is wrong only if such a tensor also reaches an
        earlier stage's model (written into it, or through an ad-hoc call of its module):
        then part of its gradient is computed there, and the earlier stage raises when its
        copy of the tensor receives one (:meth:`_split`).
        """
        seam = self.seam
        base = _PART.sub("", of) if of is not None else None
        stage = seam.owner.get(base) if base is not None else None
        if stage is None:
            stage = self.parameters.get(base)
        last = stage is None
        if last:
            stage = seam.topo.pp - 1
        seam.owner[location] = stage
        self.named.add(location)
        if stage == seam.topo.pp_rank:
            return False
        seam.remote.add(location)
        if last and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            self.detectors.append(tensor.register_hook(self._split(location)))
        return True

    def _split(self, location: str) -> Callable[[torch.Tensor], None]:
        """A hook on this (earlier) stage's copy of a tensor whose gradient the last stage
        serves: it fires only if the tensor reached this stage's model."""
        stage = self.seam.topo.pp_rank

        def fire(grad: torch.Tensor) -> None:
            raise NNsightError(
                f"the gradient of a tensor the body computed ({location}) cannot be shown whole: the tensor "
                f"reached the model of stage {stage} (written into it, or through an ad-hoc call of its module), "
                f"so part of its gradient is computed on stage {stage} and the rest on the last stage. Read the "
                "gradient of the location it was written to instead (read that location again after the write, "
                "and its `.grad`)"
            )

        return fire

    def run(self, run: Callable[..., None]) -> None:
        """One backward pass on this stage (see the module docstring)."""
        seam, topo, router = self.seam, self.seam.topo, self.seam.router
        if topo.pp == 1:
            run()
            return
        self.passes += 1
        n, stage = self.passes, topo.pp_rank
        earlier = {s: topo.rank_of(s, topo.tp_rank) for s in range(stage)}
        later = {s: topo.rank_of(s, topo.tp_rank) for s in range(stage + 1, topo.pp)}
        try:
            self._local(run, n, later)
        finally:
            for handle in self.detectors:
                handle.remove()
            self.detectors = []
        failure = seam.interleaver.failure
        if failure is not None:
            raise failure  # the run failed in the pass: the body ends here (the others are told)
        for s, peer in later.items():
            if router.gradients(peer):
                raise NNsightError(
                    f"a gradient of backward pass {n} flows from stage {stage} back to stage {s}, whose part "
                    f"of the pass is over: a value of stage {s} went through a module of stage {stage} (an "
                    "ad-hoc call of an earlier stage's module on a later stage's value). Call the module on "
                    "values of its own stage or earlier ones, or trace with pp=1"
                )
        for s, peer in earlier.items():
            router.send(peer, ("grads", n, stage), router.gradients(peer))
        for peer in later.values():
            router.send(peer, ("gdone", n, stage), None)
        for s, peer in earlier.items():
            router.wait(("gdone", n, s), f"the end of backward pass {n} on stage {s}", peer)

    def _local(self, run: Callable[..., None], n: int, later: dict[int, int]) -> None:
        """This stage's part of pass ``n``: from the loss on the last stage, else from what
        this stage sent, with the gradients the ``later`` stages (stage -> rank) sent back."""
        router = self.seam.router
        if not later:
            run()
            return
        roots, grads = [], []
        for s, peer in later.items():
            entries = router.wait(("grads", n, s), f"the gradients of backward pass {n}", peer)
            for key, i, grad in entries:
                roots.append(router.outgoing[(peer, key)][i])
                grads.append(grad)
        if roots:
            run(roots, grads)
