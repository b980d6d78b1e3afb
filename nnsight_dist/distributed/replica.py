"""The replica seam: this rank's part in a trace shared by the ranks of one replica.

It implements the interleaver's :class:`~nnsight_dist.intervention.seam.Seam` from the
engine's placements:

- locations owned by another stage are *remote*: their values come from the owner over
  the :class:`~.router.Router`, keyed by ``(mediator, request number)``; writes to them
  are dropped here because the owner applies them; the result of an ad-hoc call of such
  a module (or one of its parameters) is waited for inside the visit in progress
  (:meth:`ReplicaSeam.wait_remote`), since the owner computes it from values the body
  already had;
- fragmented locations of this stage get a :class:`~.placement.LayoutCodec` (at tp > 1,
  every location does when the engine names opaque types, such as the key/value cache);
- every value served at an owned (non-replicated) location is pushed to the other stages
  once, without being asked; the values a whole-value cache observes go together, in one
  message per other stage, when the trace drains;
- a backward pass starts once every rank of the replica starts it
  (:meth:`ReplicaSeam.backward`), and the gradient of a tensor-parallel parameter is served
  whole (:meth:`ReplicaSeam.gradient_codec`).

At the end of a trace (:meth:`ReplicaSeam.drain`) every rank ends its streams with an
end-of-trace message and takes in its peers' streams up to theirs (serving late
arrivals), completes its sends, and passes a cross-rank barrier comparing a digest of what
it served (:meth:`ReplicaSeam.close`), the trace's one closing collective: a difference
raises :class:`DivergenceError` naming the first one.

A failed run publishes its error at once (:meth:`ReplicaSeam.failed`), so the other ranks
raise :class:`RemoteError` instead of waiting, and runs its model call to the end without
interventions (the engine's collectives and transfers match). Every rank then *settles*
the trace (:meth:`ReplicaSeam.fail`): it writes the ledger of the collectives it issued to
the store, reads the others', and issues the ones it missed, so that nothing is left
posted, half-matched or counted differently when the next trace starts.

*Stage-local* traces (:meth:`ReplicaSeam.stage_local`, used by the activation store's
collection) let the stages of a replica work on different traces at once: stage 0 runs
trace k+1 while stage 1 runs trace k. Only the engine's hidden states travel between the
stages (the logits stay on the last stage: nobody reads them); the end-of-trace exchanges,
the input check and the settling of a failure stay within the stage's tensor-parallel
group; nothing else may cross stages (a body reading another stage's value is refused).
A stage is then at most one trace ahead: completing the send of its hidden states waits
for the next stage to take them. Errors do not cross stages inside such traces: the
caller exchanges them itself (the collection does, once per chunk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..intervention.errors import DivergenceError, NNsightError, RemoteError, RouterTimeout
from ..intervention.batcher import tensors
from ..intervention.interleaver import Interleaver
from ..intervention.seam import Codec, Seam
from .exchange import all_gather_json, gather_cache
from .divergence import CheckMode, digest, first_difference
from .failure import _LOST, Failures, communication_error, explained
from .gradients import PipelineBackward
from .placement import (LOCAL, PARAMETER_LISTINGS, WHOLE, LayoutCodec, ParameterGradient, Placement, StandIn, Unplaced,
                        fragmented, holds_dtensor_shards, whole_parameter)
from .router import Router, _shape_only
from .topology import Topology, at_exit


_ROUTERS: dict[int, Router] = {}


def shared_router(topo: Topology) -> Router:
    """The one router of this process: every model traced here shares its streams (two
    routers would race for the same messages), one trace at a time."""
    router = _ROUTERS.get(id(topo))
    if router is None:
        router = _ROUTERS[id(topo)] = Router(topo, Failures(topo), topo.group("router"), topo.payload_groups(),
                                             topo.device)
        at_exit(router.close)
    return router


class ReplicaSeam(Seam):
    """See the module docstring."""

    routing = True
    tolerant = True

    def __init__(self, topo: Topology, placements: dict[str, Placement], interleaver: Interleaver,
                 opaque: tuple[type, ...] = (), backward_refused: Optional[str] = None) -> None:
        super().__init__()
        self.topo = topo
        #: Why the engine's sharded model gives no gradients (``None``: it does).
        self.backward_refused = backward_refused
        self.interleaver = interleaver
        self.router = shared_router(topo)
        self.failures = self.router.failures
        self.opaque = opaque if topo.tp > 1 else ()
        self.owner: dict[str, Optional[int]] = {}
        #: Locations of this stage whose value (or a part of it) differs between tp ranks.
        self.fragmented: set[str] = set()
        for path, p in placements.items():
            for key, placement in (("input", p.input), ("output", p.output)):
                location = f"{path}.{key}"
                self.owner[location] = p.owner_stage
                if p.owner_stage is not None and p.owner_stage != topo.pp_rank:
                    self.remote.add(location)
                elif key == "input" and p.stand_in_input:
                    self.codecs[location] = StandIn(location)
                elif topo.tp > 1:
                    if fragmented(placement):
                        self.fragmented.add(location)
                    codec = self._codec(placement, location, key == "input", path)
                    if codec is not None:
                        self.codecs[location] = codec
        #: (module path, parameter name) -> the codec serving that plain-tensor fragment whole.
        self.fragment_parameters = {(path, name): self._codec(placement, f"{path}.{name}", False, path)
                                    for path, p in placements.items() for name, placement in p.parameters
                                    if topo.tp > 1}
        root = next((p for path, p in placements.items() if "." not in path), None)
        result = root.output if root is not None and topo.tp > 1 else WHOLE
        if self.opaque or result != WHOLE:
            # What the traced call returned holds the model's output (its key/value cache too).
            self.codecs["result"] = self._codec(result, "tracer.result", False, "")
        self.log: list[tuple[int, int, str]] = []
        self._ended = False
        self._observed: list = []
        self._fragments: list = []
        self.attribute_reads = 0
        #: Modules whose submodules run on different stages: no one rank can call them.
        self.spanning = _spanning(placements)
        #: Ad-hoc calls being waited for in :meth:`wait_remote` (nested waits are possible).
        self._calls: dict[tuple[int, int], str] = {}
        self.check = CheckMode(topo, self.failures)
        self.gradients = PipelineBackward(self)

    def _codec(self, placement: str, location: str, on_input: bool, module: str) -> Optional[Codec]:
        """The codec of a location of this stage (``None``: its value is whole as it is)."""
        if placement == LOCAL:
            return Unplaced(location, module)
        if placement == WHOLE and not self.opaque:
            return None
        return LayoutCodec(placement, self.topo.group("tp"), self.topo.tp, self.topo.tp_rank, self.failures,
                           location, on_input, self.opaque)

    # ------------------------------------------------------------------ seam

    def served(self, mediator: int, seq: int, location: str, value: Any) -> None:
        self.log.append((mediator, seq, location))
        if self.owner.get(location) is not None:
            self.router.broadcast(("v", mediator, seq, location), value, location=location)

    def fetch(self, mediator: int, seq: int, location: str) -> tuple[bool, Any]:
        # A message for this request under another location is left over and reported as a
        # divergence when the trace drains. A request is logged once it is served, as on its
        # owner: one the run never reaches (a step loop cut short) is logged nowhere.
        found, value = self.router.take(("v", mediator, seq, location))
        if found:
            self.log.append((mediator, seq, location))
        return found, value

    def check_call(self, path: str) -> None:
        """A module whose submodules run on different stages holds placeholders for the
        other stages' layers on every rank: a call would pass values through them and give
        a wrong result, so it is refused (the same way on every rank)."""
        if path in self.spanning:
            raise NNsightError(
                f"{path} spans pipeline stages (its submodules run on stages {self.spanning[path]}): no rank "
                "can call it ad hoc. Call the modules of one stage instead (a layer, the norm, lm_head), "
                "or trace with pp=1"
            )

    def wait_remote(self, mediator: int, seq: int, location: str) -> Any:
        """An ad-hoc call's result from the owner: a router-aware wait (see docs/design.md,
        "Ad-hoc calls across stages"). The owner's copy of the mediator computes it from
        values this rank already sent or that are on their way to it, so the owner needs
        nothing from this rank but that its streams are drained."""
        source = self.topo.rank_of(self.owner[location], self.topo.tp_rank)
        module = location[: -len(".output")]
        what = f"the ad-hoc call of {module} (request {seq} of {self._name(mediator)})"
        self._calls[(mediator, seq)] = location
        try:
            value = self.router.wait(("v", mediator, seq, location), what, source)
        finally:
            del self._calls[(mediator, seq)]
        self.log.append((mediator, seq, location))
        return value

    def _name(self, mediator: int) -> str:
        med = next((m for m in self.interleaver.mediators if m.index == mediator), None)
        return med.name if med is not None and med.name else f"mediator {mediator}"

    def attribute(self, path: str, name: str, local: Callable[[], Any]) -> Any:
        """Tensors (parameters, buffers) of a module owned by one stage come from that stage:
        the other stages hold the module without weights. A parameter held as a plain
        fragment is served whole; the module's own listings of its parameters would give the
        fragments as they are, and are refused."""
        if name in PARAMETER_LISTINGS and any(owner == path or owner.startswith(path + ".")
                                               for owner, _ in self.fragment_parameters):
            raise NNsightError(
                f"{path}.{name}() would list this rank's slices of the engine's sliced weights as if they were "
                f"whole: read each parameter by its name (`{path}.<module>.weight`), which is gathered whole"
            )
        layout = self.fragment_parameters.get((path, name))
        if layout is not None:
            plain = local
            local = lambda: whole_parameter(plain(), layout)  # noqa: E731
        location = f"{path}.output"
        stage = self.owner.get(location)
        if stage is None or self.topo.pp == 1:
            return local()
        router = self.router
        if location in self.remote:
            try:
                return local()
            except AttributeError:
                pass
            self.attribute_reads += 1
            source = self.topo.rank_of(stage, self.topo.tp_rank)
            key = ("p", path, name, self.attribute_reads)
            # Like an ad-hoc call: the owner reads it from what the body already had.
            found = self.interleaver.synchronous(lambda: router.wait(key, f"attribute {name} of {path}", source))
            if found is None:
                raise AttributeError(name)
            return self.gradients.parameter(path, name, stage, found["value"])
        try:
            value = local()
        except AttributeError:
            self.attribute_reads += 1
            router.broadcast(("p", path, name, self.attribute_reads), None)
            raise
        if isinstance(value, torch.Tensor):
            self.attribute_reads += 1
            router.broadcast(("p", path, name, self.attribute_reads), {"value": value})
        return self.gradients.parameter(path, name, stage, value)

    def gradient(self, location: str, of: Optional[str], tensor: Any) -> bool:
        """The gradient of a value is computed by the stage whose tensor is in the real
        graph, and served to the others (see :mod:`.gradients`)."""
        return self.gradients.is_remote(location, of, tensor)

    def check_plain_backward(self) -> None:
        """Under pp torch's own backward stops at this stage's boundary, and ``.grad`` of a
        value another stage owns would read a copy's: refused (the same way on every rank)."""
        self._check_engine_backward()
        if self.topo.pp > 1:
            raise NNsightError(
                "loss.backward() as a statement runs autograd on this pipeline stage only: the gradient "
                "would not reach the other stages, and `.grad` of their values would read a copy's. "
                "Use a backward block: `with loss.backward(): g = h.grad.save()`"
            )

    def _check_engine_backward(self) -> None:
        if self.backward_refused is not None:
            raise NNsightError(f"this model's engine gives no gradients: {self.backward_refused}")

    def defer(self, observer: Any, visit: int, location: str, value: Any) -> bool:
        """Fragments a whole-value cache observes are gathered together when the run ends
        (one collective per dtype instead of one per visit); nothing waits on them before."""
        codec = self.codecs.get(location)
        if not isinstance(codec, LayoutCodec) or not codec.plain_fragment or not isinstance(value, torch.Tensor) \
                or _shape_only(value):
            return False
        self._fragments.append((observer, visit, location, value.detach().clone(), codec))
        return True

    def _assemble_fragments(self) -> None:
        """Gather every deferred fragment (see :meth:`defer`) and hand each observer its value."""
        pending, self._fragments = self._fragments, []
        by_dtype: dict[torch.dtype, list] = {}
        for item in pending:
            by_dtype.setdefault(item[3].dtype, []).append(item)
        group, tp = self.topo.group("tp"), self.topo.tp
        for items in by_dtype.values():
            flat = torch.cat([item[3].reshape(-1) for item in items])
            parts = [torch.empty_like(flat) for _ in range(tp)]
            self.failures.all_gather(parts, flat, group, "the all-gather of the cached fragments",
                                     "its tensor-parallel group")
            offset = 0
            for observer, visit, location, local, codec in items:
                n = local.numel()
                pieces = [p[offset:offset + n].view(local.shape) for p in parts]
                offset += n
                whole = sum(pieces[1:], pieces[0]) if codec.partial else torch.cat(pieces, dim=codec.dim)
                observer.fn(whole, visit)
                if observer.routed and self.owner.get(location) is not None:
                    self._observed.append([observer.index, visit, whole])

    def operations(self, path: str, names: list[str], children: dict[str, tuple[str, bool]],
                   instance: Any = None) -> None:
        """Operations live where their module lives. Inside a tensor-parallel module, an
        operation whose value is exactly a child module's call (the call ``self.<child>(x)``,
        or ``y = self.<child>(x)``: see :meth:`Seam.operations`) has the child's placement;
        any other operation holds a fragment the engine does not describe, and reading it
        is refused. A module holding parameter fragments (listed by the engine, or ``DTensor``
        shards) is tensor-parallel also when its input and output are whole: it slices its
        input itself, or gathers or reduces its output, and what comes before is a fragment."""
        module = f"{path}.output"
        depth = len(path.split("."))
        modules = {name.split(".")[depth] for name in self.owner if name.startswith(path + ".")}
        fragmented = (any(loc.startswith(path + ".") for loc in self.fragmented)
                      or any(owner == path for owner, _ in self.fragment_parameters)
                      or (instance is not None and holds_dtensor_shards(instance)))
        for name in names:
            attr, is_call = children.get(name, (None, False))
            child = f"{path}.{attr}" if attr in modules else None
            for key in ("input", "output"):
                location = f"{path}.{name}.{key}"
                self.owner[location] = self.owner.get(module)
                if module in self.remote:
                    self.remote.add(location)
                    continue
                if child is None:
                    if fragmented:
                        self.codecs[location] = Unplaced(location, path)
                    elif self.opaque:
                        self.codecs[location] = self._codec(WHOLE, location, key == "input", path)
                    continue
                # An assignment's input is ((value,), {}): the child's output as first argument.
                source = f"{child}.{key}" if is_call or key == "output" else f"{child}.output"
                placement = self.placement(source)
                if source in self.fragmented:
                    self.fragmented.add(location)
                if isinstance(self.codecs.get(source), Unplaced) or (
                        not is_call and key == "input" and placement[:1] in ("(", "{")):
                    # Undescribed; or per-element placements that name the parts of the child's
                    # output, not those of the assignment's ((value,), {}).
                    self.codecs[location] = Unplaced(location, path)
                    continue
                codec = self._codec(placement, location, key == "input", path)
                if codec is not None:
                    self.codecs[location] = codec

    def placement(self, location: str) -> str:
        codec = self.codecs.get(location)
        return codec.placement if isinstance(codec, LayoutCodec) else WHOLE

    def gradient_codec(self, tensor: Any) -> Optional[Codec]:
        """A tensor-parallel parameter (a ``DTensor``) has its gradient in shards."""
        if not hasattr(tensor, "full_tensor"):
            return None
        layout = LayoutCodec(WHOLE, self.topo.group("tp"), self.topo.tp, self.topo.tp_rank, self.failures,
                             "the gradient of a tensor-parallel parameter", False)
        return ParameterGradient(layout)

    def backward(self, run: Callable[..., None]) -> None:
        """Run a backward pass once every rank of the replica starts it, then stage by stage
        in reverse (see :mod:`.gradients`). The engine's collectives in the pass would wait
        for a rank whose run has failed (that rank's body never gets to its backward block):
        the ranks agree in one small guarded all-gather, where such a failure is raised
        instead; inside the pass every rank goes on to its end (gradient visits are
        :meth:`~.Interleaver.guarded`)."""
        self._check_engine_backward()
        ranks, group = self._scope()
        if len(ranks) > 1:
            parts = [torch.zeros(1) for _ in ranks]
            self.failures.all_gather(parts, torch.zeros(1), group, "the start of a backward pass", "the replica")
        self.gradients.run(run)

    def gather_cache(self, cache: Any, placements: dict, dst: int) -> Any:
        return gather_cache(self.topo, self.failures, cache, placements, dst)

    def observed(self, observer: int, visit: int, location: str, value: Any) -> None:
        # Observed values (caches) are wanted only after the run: they travel together, in
        # one message per other stage when the trace drains.
        if self.owner.get(location) is not None:
            self._observed.append([observer, visit, value])

    def inputs(self, args: tuple, kwargs: dict) -> None:
        """Every rank of a replica must run the model on the same inputs: with different
        ones the engine's collectives would pair tensors of different sizes (a crash
        inside gloo) or mix different prompts' values without an error. One small
        all-gather of a digest per trace; a difference is a :class:`DivergenceError` on
        every rank, before the model runs."""
        found = tensors((args, kwargs))
        ranks, group = self._scope()
        if len(ranks) == 1 or any(_shape_only(t) for t in found):
            return  # a scan: shapes only, and the ranks compare what they serve
        mine = torch.tensor([digest(found)], dtype=torch.long)
        parts = [torch.zeros(1, dtype=torch.long) for _ in ranks]
        self.failures.all_gather(parts, mine, group, "the check of the trace's inputs", "the replica")
        digests = [int(p.item()) for p in parts]
        if len(set(digests)) > 1:
            differ = [r for r, d in zip(ranks, digests) if d != digests[0]]
            raise DivergenceError(
                f"the ranks of this replica were given different inputs (ranks {differ} differ from rank "
                f"{ranks[0]}): every rank of a replica ({len(ranks)} ranks, tp x pp) must trace the same "
                "prompts. Split data between replicas by `model.topology.dp_rank`, not between the ranks "
                "of one replica"
            )

    def verify(self, location: str, value: Any) -> None:
        """Check mode (see :class:`.divergence.CheckMode`)."""
        self.check.verify(location, value)

    def _check_same(self, theirs: str, mine: str, mediator: int, seq: int) -> None:
        if theirs != mine:
            raise DivergenceError(
                f"request {seq} of {self._name(mediator)} is {mine} on rank {self.topo.rank} but {theirs} "
                "on its owner: ranks ran different intervention code (branching on the rank inside a "
                "trace is not allowed)"
            )

    def _arrived(self, source: int, key: tuple, value: Any) -> None:
        try:
            self._take(key, value)
        except Exception as error:  # a divergence, or an observer's error: the run fails
            if not self.interleaver.tolerate(error):
                raise

    def _take(self, key: tuple, value: Any) -> None:
        kind = key[0]
        if kind == "v":
            _, mediator, seq, location = key
            med = self.interleaver.remote_waiting.get((mediator, seq))
            if med is not None:
                self._check_same(location, med.wait.location, mediator, seq)
                self.router.mailbox.pop((self.router.trace, key), None)
                self.log.append((mediator, seq, location))
                self.interleaver.deliver(mediator, seq, value)
            elif (mediator, seq) in self._calls:  # waited for in wait_remote, which takes it
                self._check_same(location, self._calls[(mediator, seq)], mediator, seq)
        elif kind == "o":
            self.router.mailbox.pop((self.router.trace, key), None)
            observers = self.interleaver.observer_list
            for observer, visit, observed in value:
                observers[observer].fn(observed, visit)

    # ------------------------------------------------------------------ trace lifecycle

    def _waiting(self) -> str:
        """The mediators parked on values from other stages, for timeout messages."""
        waits = []
        for (_, seq), med in sorted(self.interleaver.remote_waiting.items(), key=lambda kv: kv[0]):
            stage = self.owner.get(med.wait.location)
            source = self.topo.rank_of(stage, self.topo.tp_rank) if stage is not None else "?"
            waits.append(f"{med.name or med.index} waits for {med.wait.location} (request {seq}) from rank {source}")
        return f"; meanwhile {'; '.join(waits)}" if waits else ""

    def begin(self) -> None:
        """Start a trace."""
        self.failures.context = self._waiting
        self.check.begin()
        self.router.on_message = self._arrived
        self.router.next_trace()
        self.gradients.begin(self.interleaver.calls_backward)
        self.log = []
        self._ended = False
        self._observed: list = []
        self._fragments: list = []

    def drain(self) -> None:
        """Take in every message of this trace (serving late arrivals); complete the sends.

        Every rank ends its streams with an end-of-trace message (:meth:`.Router.end_trace`)
        and takes in its peers' streams up to theirs: a message, not a collective, so the
        digest barrier (:meth:`close`) is the one collective that ends a trace.
        """
        if self._fragments:
            self._assemble_fragments()
        router = self.router
        if not router.peers:
            return  # one stage: nothing travels between stages
        if router.stage_local:
            crossing = sorted(set(router.traffic) - {"h"})
            if crossing or self.interleaver.remote_waiting:
                raise NNsightError(
                    "a stage-local trace (the activation store's collection) moved values between stages "
                    f"({', '.join(crossing) or 'a request for another stage'}): its bodies may only observe "
                    "their own stage")
            router.complete_sends()
            return
        if not self._ended:
            if self._observed:
                router.broadcast(("o", self.topo.rank), self._observed)
                self._observed = []
            router.end_trace()
            self._ended = True
        router.wait_ends()
        router.complete_sends(wait=False)
        self._check_leftovers()

    def _check_leftovers(self) -> None:
        """A value the owner served that no request here matches means the ranks diverged."""
        for (trace, key), (source, _) in self.router.mailbox.items():
            if trace == self.router.trace and key[0] == "v":
                _, mediator, seq, location = key
                waiting = [f"{m.wait.location} as request {s}" for (i, s), m in
                           self.interleaver.remote_waiting.items() if i == mediator]
                mine = f"; here it waits for {', '.join(waiting)}" if waiting else ""
                raise DivergenceError(
                    f"rank {source} served {location} as request {seq} of {self._name(mediator)}, which rank "
                    f"{self.topo.rank} never asked for{mine}: the intervention code differs between ranks "
                    "(branching on the rank inside a trace is not allowed)"
                )

    def _scope(self) -> tuple[list[int], Any]:
        """The ranks (and their group) a trace's own exchanges span: the replica, or this
        stage's tensor-parallel group in a stage-local trace."""
        if self.router.stage_local:
            return self.failures.members("tp"), self.topo.group("tp")
        return self.topo.replica_ranks(), self.topo.group("replica")

    @contextlib.contextmanager
    def stage_local(self) -> Iterator[None]:
        """Run the traces of the block stage-locally (see the module docstring)."""
        router, failures = self.router, self.failures
        router.stage_local, failures.scope = True, self.failures.members("tp")
        try:
            yield
        finally:
            router.stage_local, failures.scope = False, None

    def close(self) -> None:
        """The digest barrier (see the module docstring), then check mode's comparison."""
        self._barrier()
        self.check.compare()

    def failed(self, error: BaseException) -> None:
        """The run failed here: tell the other ranks now (they stop waiting for this one and
        fail their runs too); end this rank's waits; ignore what still arrives."""
        self.failures.publish(explained(error))
        self.failures.failed = error
        self.router.on_message = None

    def fail(self, error: BaseException) -> Optional[BaseException]:
        """Close a failed trace; returns the error to raise instead of ``error``, if any.

        A failure that is a consequence of another rank's (a broken connection, a collective
        that failed) is reported as that rank's error. Otherwise this rank's error is
        published. Then the trace is settled (:meth:`_settle`), unless a rank was lost (or
        a process group broke): then nobody is left to settle with, every rank is told
        (:meth:`.Failures.mark_lost`) and the job must restart.
        """
        broken = not isinstance(error, NNsightError) and communication_error(error)
        cause = self.failures.remote() if broken else None
        if broken and cause is None:
            if "timed out" in str(error).lower() or "timeout" in str(error).lower():
                cause = RouterTimeout(
                    f"rank {self.topo.rank} waited {self.topo.timeout:g} s in a collective of the engine that "
                    f"another rank of the replica never joined ({error})"
                )
            else:
                cause = RemoteError(-1, f"a rank of the replica stopped answering ({error}); it probably died")
        if cause is None and explained(error) is not error:
            cause = explained(error)
        self.failures.publish(cause or error)  # not if it came from another rank
        lost = cause if broken else error if getattr(error, "lost", False) else None
        if lost is None:
            self._settle()
        elif isinstance(lost, RemoteError):
            self.failures.mark_lost(lost.rank, lost.remote_message)
        else:
            self.failures.mark_lost(-1, str(lost))
        return cause

    def _settle(self) -> None:
        """The end of a failed trace on every rank: write this rank's ledger of collectives
        (:class:`~.failure.Failures`) to the store, wait (bounded by the timeout) until
        every other rank of the replica has written its own or passed the end-of-trace
        barrier, and issue the collectives this rank missed."""
        store = self.failures._store
        if store is None:
            return
        trace, me = self.router.trace, self.topo.rank
        try:
            self.failures.set("end", json.dumps(self.failures.ledger))
            ledgers = {me: self.failures.ledger}
            pending = [r for r in self._scope()[0] if r != me]
            deadline = time.monotonic() + self.topo.timeout
            while pending and time.monotonic() < deadline:
                if store.check([_LOST]):
                    return  # a rank died: nobody is left to settle with
                for rank in list(pending):
                    key = f"nnsight_dist/end/{trace}/{rank}"
                    if store.check([key]):
                        ledgers[rank] = json.loads(store.get(key).decode())
                        pending.remove(rank)
                    elif store.check([f"nnsight_dist/done/{trace}/{rank}"]):
                        pending.remove(rank)  # it passed the barrier: its ledger is ours
                if pending:
                    time.sleep(0.002)
            self.failures.reconcile(ledgers)
        except (RuntimeError, dist.DistError, RemoteError):
            pass  # the store or a peer is gone (a rank died): nothing to settle with; the error stands

    def _barrier(self) -> None:
        il = self.interleaver
        entries = sorted(self.log)
        digest = hashlib.blake2b(json.dumps(entries).encode(), digest_size=7).digest()
        # Stages visit different numbers of call points (a placeholder layer's submodules are
        # not called), so the steps and what was served are compared, not the visit count.
        mine = torch.tensor([il.step + 1, len(entries), int.from_bytes(digest, "little")], dtype=torch.long)
        ranks, group = self._scope()
        if len(ranks) == 1:
            return
        parts = [torch.zeros(3, dtype=torch.long) for _ in ranks]
        self.failures.all_gather(parts, mine, group, "the end-of-trace barrier", "the replica")
        if self.failures._store is not None and self.check.compares():
            # Read by a rank that fails after the barrier (only check mode's comparison comes
            # after it) deciding whether the others are still running; a store round trip,
            # so only then.
            self.failures.set("done", "ok")
        if all(torch.equal(p, mine) for p in parts):
            return
        steps = [int(p[0]) for p in parts]
        if len(set(steps)) > 1:
            raise DivergenceError(f"ranks {ranks} ran {steps} steps of the model")
        logs = all_gather_json(entries, group, len(ranks), self.failures)
        raise DivergenceError(first_difference(ranks, logs))


def _spanning(placements: dict[str, Placement]) -> dict[str, list[int]]:
    """Module paths whose subtree holds modules of more than one stage, with those stages."""
    stages: dict[str, set] = {}
    for path, p in placements.items():
        if p.owner_stage is None:
            continue
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            stages.setdefault(".".join(parts[:i]), set()).add(p.owner_stage)
    return {path: sorted(found) for path, found in stages.items() if len(found) > 1 and path in placements}
