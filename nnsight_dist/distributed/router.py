"""The router: whole values from their owner stage to the other stages of the replica.

Rank ``(stage s, tp t)`` talks to ``(stage s', tp t)`` for every other stage ``s'``. Each
ordered pair is one *stream*: messages arrive in the order they were sent (gloo keeps a
pair's messages in order, and nothing here relies on tags). A message is

1. a header: ``int64[3] = (trace, bytes of meta, bytes of body)``;
2. a body: the meta, JSON bytes ``{"key": [...], "value": structure, "tensors": [[dtype,
   shape], ...]}`` where the structure holds lists, dicts, numbers, strings and
   ``{"__tensor__": i}``, followed by the raw bytes of every tensor.

Nothing is pickled. The receiver keeps one header receive posted per incoming stream at
all times and drains every stream in order into a *mailbox* keyed by ``(trace, key)``, so
the order in which its mediators ask does not matter and a message never lands in a
receive meant for another. Sends are asynchronous (on copies, so later in-place edits do
not race them) and completed at the end of each trace.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .failure import _DTYPES, Failures, lost_contact
from .topology import Topology


def encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A JSON-able structure for ``value``; its tensors are appended to ``tensors``.

    Values that are neither tensors nor JSON-able (a KV cache object, say) travel as
    ``{"__opaque__": type name}`` and arrive as ``None``; tensors without data (a scan's
    fake tensors) travel as their shape and dtype.
    """
    if isinstance(value, torch.Tensor):
        if _shape_only(value):
            return {"__shape__": list(value.shape), "dtype": str(value.dtype)}
        tensors.append(value)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(value, (list, tuple)):
        return {"__seq__": [encode(v, tensors) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        encoded = {"__map__": [[str(k), encode(v, tensors)] for k, v in value.items()]}
        cls = type(value)
        if cls is not dict and cls.__module__.startswith("transformers."):
            encoded["class"] = [cls.__module__, cls.__qualname__]
        return encoded
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Size):
        return list(value)
    return {"__opaque__": type(value).__name__}


def _output_class(name: Optional[list]) -> Optional[type]:
    """A transformers ``ModelOutput`` class named ``[module, qualname]`` (nothing else is
    ever looked up), so a routed model output keeps its attributes."""
    if not name or not name[0].startswith("transformers."):
        return None
    import importlib

    from transformers.utils import ModelOutput

    cls = getattr(importlib.import_module(name[0]), name[1], None)
    return cls if isinstance(cls, type) and issubclass(cls, ModelOutput) else None


def _real_tensors():
    """Buffers that really travel must be real even inside a scan's fake-tensor mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _shape_only(t: torch.Tensor) -> bool:
    """A tensor with a shape and no data (a scan's fake tensors, meta tensors): its shape travels."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def decode(structure: Any, tensors: list[torch.Tensor]) -> Any:
    """The value of an :func:`encode` structure."""
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__shape__" in structure:
            return torch.empty(structure["__shape__"], dtype=_DTYPES[structure["dtype"]])
        if "__seq__" in structure:
            items = [decode(v, tensors) for v in structure["__seq__"]]
            return tuple(items) if structure["tuple"] else items
        if "__map__" in structure:
            mapping = {k: decode(v, tensors) for k, v in structure["__map__"]}
            cls = _output_class(structure.get("class"))
            return mapping if cls is None else cls(**mapping)
        return None
    return structure


class Completion:
    """Completion of point-to-point works, observable without blocking (see :class:`Waiter`)."""

    def __init__(self, notify: Optional[threading.Event] = None) -> None:
        self.event = threading.Event()
        self.error: Optional[BaseException] = None
        self.notify = notify

    def done(self) -> bool:
        """True once every work completed; raises the error of a failed one."""
        if not self.event.is_set():
            return False
        if self.error is not None:
            raise self.error
        return True


class Waiter:
    """A daemon thread that waits on gloo works, in order, and marks their completions.

    gloo reports a send or receive as completed only once someone waits on it; this thread
    waits so the model's thread never blocks. It touches no tensor.
    """

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[tuple[list, Completion]]" = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def watch(self, works: list, notify: Optional[threading.Event] = None) -> Completion:
        """A completion that turns done when every work of ``works`` has completed."""
        completion = Completion(notify)
        self._queue.put((works, completion))
        return completion

    def _run(self) -> None:
        while True:
            works, completion = self._queue.get()
            try:
                for work in works:
                    work.wait()
            except BaseException as e:  # reported to the model's thread by done()
                completion.error = e
            finally:
                completion.event.set()
                if completion.notify is not None:
                    completion.notify.set()


class _Incoming:
    """One incoming stream: its posted header receive, watched by a thread of its own."""

    def __init__(self, peer: int, group: Any, arrived: threading.Event) -> None:
        self.peer = peer
        self.group = group
        self.arrived = arrived
        self.waiter = Waiter()
        self.received: Any = None
        self.repost()

    def repost(self) -> None:
        self.header = torch.zeros(3, dtype=torch.long)
        work = dist.irecv(self.header, src=self.peer, group=self.group)
        self.work = self.waiter.watch([work], self.arrived)


class Router:
    """Streams to and from the other stages of this rank's replica (see the module docstring)."""

    def __init__(self, topo: Topology, failures: Failures, group: Any) -> None:
        self.topo = topo
        self.failures = failures
        self.group = group
        self.trace = 0
        self.peers = [topo.rank_of(s, topo.tp_rank) for s in range(topo.pp) if s != topo.pp_rank]
        #: Set whenever a header arrives on any stream (wakes router-aware waits).
        self.arrived = threading.Event()
        self.incoming = {peer: _Incoming(peer, group, self.arrived) for peer in self.peers}
        self.sender = Waiter()
        self.mailbox: dict[tuple, tuple[int, Any]] = {}
        self.sends: list[tuple[Any, list[torch.Tensor]]] = []
        self.messages = 0
        self.bytes = 0
        #: Messages and payload bytes sent in the current trace, by kind of key
        #: ("v" served values, "o" observed values, "h" hidden states, "logits", "p" attributes).
        self.traffic: dict[str, list[int]] = {}
        #: Messages of the current trace sent to / received from each peer.
        self.sent: dict[int, int] = dict.fromkeys(self.peers, 0)
        self.received: dict[int, int] = dict.fromkeys(self.peers, 0)
        self.closed = False
        #: In a stage-local trace (:meth:`.replica.ReplicaSeam.stage_local`) only the hidden
        #: states travel: the engine keeps the logits on the last stage.
        self.stage_local = False
        #: Called with (source rank, key, value) for each message of the current trace.
        self.on_message: Optional[Callable[[int, tuple, Any], None]] = None
        #: Whether the current trace keeps autograd links across stages (it calls backward):
        #: a tensor sent with ``requires_grad`` is kept in :attr:`outgoing`, and arrives as a
        #: clone of a leaf that requires grad, kept in :attr:`leaves` (see :mod:`.gradients`).
        self.graph = False
        #: (destination, key) -> {index of the tensor in the message: tensor sent}.
        self.outgoing: dict[tuple[int, tuple], dict[int, torch.Tensor]] = {}
        #: (trace, source, key) -> {index of the tensor in the message: leaf received}.
        self.leaves: dict[tuple[int, int, tuple], dict[int, torch.Tensor]] = {}

    # ------------------------------------------------------------------ sending

    def send(self, dst: int, key: tuple, value: Any) -> None:
        """Queue ``value`` to rank ``dst`` under ``key`` (asynchronous; copies the tensors)."""
        with _real_tensors():
            self._send(dst, key, value)

    def _send(self, dst: int, key: tuple, value: Any) -> None:
        tensors: list[torch.Tensor] = []
        structure = encode(value, tensors)
        header = {"key": list(key), "value": structure, "tensors": [[str(t.dtype), list(t.shape)] for t in tensors]}
        tracked = [i for i, t in enumerate(tensors) if t.requires_grad] if self.graph else []
        if tracked:
            header["grad"] = tracked
            self.outgoing[(dst, key)] = {i: tensors[i] for i in tracked}
        meta = json.dumps(header).encode()
        # One body: the meta, then every tensor's bytes. Building it copies the tensors (so
        # later in-place edits do not race the send) onto the CPU (for gloo).
        parts = [torch.frombuffer(bytearray(meta), dtype=torch.uint8)]
        parts += [t.detach().to("cpu").contiguous().view(-1).view(torch.uint8) for t in tensors]
        body = torch.cat(parts) if len(parts) > 1 else parts[0]
        header = torch.tensor([self.trace, len(meta), body.numel()], dtype=torch.long)
        works = [dist.isend(header, dst=dst, group=self.group), dist.isend(body, dst=dst, group=self.group)]
        self.sends.append((self.sender.watch(works), [header, body]))
        self.sent[dst] += 1
        self.messages += 1
        size = body.numel() - len(meta)
        self.bytes += size
        count = self.traffic.setdefault(key[0], [0, 0])
        count[0] += 1
        count[1] += size

    def broadcast(self, key: tuple, value: Any, to: Optional[list[int]] = None) -> None:
        """:meth:`send` to every peer (or to ``to``)."""
        for peer in self.peers if to is None else to:
            self.send(peer, key, value)

    def complete_sends(self) -> None:
        """Wait until every queued send has left (bounded by the timeout)."""
        for completion, _ in self.sends:
            self.failures.wait(lambda: lost_contact(completion.done, -1), "a send to complete",
                               "its receiver", self.poll)
        self.sends.clear()

    # ------------------------------------------------------------------ receiving

    def poll(self, until: Optional[Callable[[], bool]] = None) -> bool:
        """Drain the messages that have arrived, in stream order; True if there was any.

        With ``until``, stop as soon as it holds: a wait takes in exactly the messages up to
        the one it waits for, so what it delivers (and what the mediators it resumes do, tp
        collectives included) depends on the streams' contents, not on their timing, and
        is the same on every tensor-parallel rank of the stage.
        """
        got = False
        for stream in self.incoming.values():
            while not (until is not None and until()) and lost_contact(stream.work.done, stream.peer):
                with _real_tensors():
                    lost_contact(lambda: self._receive(stream), stream.peer)
                self._deliver(stream)
                got = True
        return got

    def _receive(self, stream: _Incoming) -> None:
        trace, size, length = (int(x) for x in stream.header.tolist())
        body = torch.empty(length, dtype=torch.uint8)
        # Sent right after its header: its wait ends only with it (or the timeout: this
        # group's own timeout is effectively infinite), whatever failed meanwhile, so a
        # stream is never left between a header and its body.
        received = stream.waiter.watch([dist.irecv(body, src=stream.peer, group=self.group)])
        stream.repost()
        self.failures.wait(received.done, "the body of a message", stream.peer, engine=True)
        meta = json.loads(body[:size].numpy().tobytes().decode())
        tensors, offset = [], size
        for dtype, shape in meta["tensors"]:
            kind = _DTYPES[dtype]
            n = math.prod(shape) * torch.empty((), dtype=kind).element_size()
            tensors.append(body[offset:offset + n].clone().view(kind).view(shape))
            offset += n
        stream.received = (trace, meta, tensors)

    def _deliver(self, stream: _Incoming) -> None:
        trace, meta, tensors = stream.received
        stream.received = None
        device = self.topo.device
        if device.type != "cpu":
            tensors = [t.to(device) for t in tensors]
        key = tuple(_tuple(k) for k in meta["key"])
        if trace < self.trace:
            return  # left over from a trace that already ended (it failed): nobody wants it
        if meta.get("grad"):
            tensors = self._tracked(trace, stream.peer, key, tensors, meta["grad"])
        value = decode(meta["value"], tensors)
        if trace == self.trace:
            self.received[stream.peer] += 1
        self.mailbox[(trace, key)] = (stream.peer, value)
        if trace == self.trace and self.on_message is not None:
            self.on_message(stream.peer, key, value)

    def _tracked(self, trace: int, peer: int, key: tuple, tensors: list[torch.Tensor],
                 tracked: list[int]) -> list[torch.Tensor]:
        """The tensors of a message whose sender tracked gradients of ``tracked`` ones: each of
        those becomes a leaf that requires grad (kept, its gradient goes back to the sender)
        and arrives as a clone of it, so it is no leaf, as on its sender (in-place edits work)."""
        tensors = list(tensors)
        leaves = self.leaves.setdefault((trace, peer, key), {})
        with torch.enable_grad():
            for i in tracked:
                leaf = leaves[i] = tensors[i].detach().requires_grad_()
                tensors[i] = leaf.clone()
        return tensors

    def gradients(self, peer: int) -> list:
        """``[[key, index, gradient], ...]``: the gradient each leaf received from ``peer``
        (see :meth:`_tracked`) got in the backward pass that just ran; the leaves are reset
        for the next pass. A leaf the pass did not reach is left out."""
        found = []
        for (trace, source, key), leaves in self.leaves.items():
            if trace != self.trace or source != peer:
                continue
            for i, leaf in leaves.items():
                if leaf.grad is not None:
                    found.append([key, i, leaf.grad])
                    leaf.grad = None
        return found

    def wait_received(self, counts: dict[int, int]) -> None:
        """A router-aware wait until ``counts[peer]`` messages of this trace came from each peer."""
        for peer, n in counts.items():
            self.failures.wait(lambda: self.received[peer] >= n, f"{n} message(s) of this trace", peer,
                               self.poll, self._idle)

    def take(self, key: tuple) -> tuple[bool, Any]:
        """The value under ``key`` in this trace's mailbox (removed), if it arrived."""
        item = self.mailbox.pop((self.trace, key), None)
        return (False, None) if item is None else (True, item[1])

    def wait(self, key: tuple, what: str, source: int, engine: bool = False) -> Any:
        """A router-aware wait: drain streams (serving arrivals) until ``key`` arrives
        (``engine``: one of the engine's own transfers, see :meth:`.Failures.wait`)."""
        def arrived() -> bool:
            return (self.trace, key) in self.mailbox

        self.failures.wait(arrived, what, source, lambda: self.poll(arrived), self._idle, engine)
        return self.take(key)[1]

    def _idle(self, seconds: float) -> None:
        """Sleep until a header arrives on any stream, or ``seconds``."""
        if self.arrived.wait(seconds):
            self.arrived.clear()

    def close(self, seconds: float = 10.0) -> None:
        """Say goodbye on every stream and wait for the peers' goodbyes (at exit).

        A receive still posted when the process group is torn down aborts the process; the
        goodbyes complete every posted receive first. Best effort: a dead peer is given up on.
        """
        if self.closed or not dist.is_initialized():
            return
        self.closed = True
        bye = torch.tensor([-1, 0, 0], dtype=torch.long)
        sent = self.sender.watch([dist.isend(bye, dst=peer, group=self.group) for peer in self.peers])
        waiting = dict(self.incoming)
        deadline = time.monotonic() + seconds
        try:
            while (waiting or not sent.done()) and time.monotonic() < deadline:
                for peer, stream in list(waiting.items()):
                    if stream.work.done():
                        if int(stream.header[0]) == -1:
                            del waiting[peer]
                        else:
                            self._receive(stream)
                            stream.received = None
                time.sleep(0.001)
        except (RuntimeError, dist.DistError):
            pass

    def next_trace(self) -> None:
        """Start a new trace: forget what is left of the last one."""
        self.trace += 1
        self.failures.begin(self.trace)
        self.mailbox = {k: v for k, v in self.mailbox.items() if k[0] >= self.trace}
        self.sent = dict.fromkeys(self.peers, 0)
        self.outgoing = {}
        self.leaves = {k: v for k, v in self.leaves.items() if k[0] >= self.trace}
        self.traffic = {}
        self.received = {p: sum(1 for (t, _), (src, _) in self.mailbox.items() if t == self.trace and src == p)
                         for p in self.peers}
        self.messages = 0
        self.bytes = 0


def _tuple(k: Any) -> Any:
    return tuple(_tuple(x) for x in k) if isinstance(k, list) else k
