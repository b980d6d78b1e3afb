"""The router: whole values from their owner stage to the other stages of the replica.

Rank ``(stage s, tp t)`` talks to ``(stage s', tp t)`` for every other stage ``s'``. Each
ordered pair is one *stream*: messages arrive in the order they were sent (gloo keeps a
pair's messages in order, and nothing here relies on tags). A message is one contiguous
byte buffer:

1. a header: ``int64[4] = (trace, bytes of meta, bytes of the buffer, bytes on the device)``;
2. the meta, JSON bytes ``{"key": [...], "value": structure, "tensors": [[dtype, shape,
   on device], ...]}`` where the structure holds lists, dicts, numbers, strings and
   ``{"__tensor__": i}``;
3. the raw bytes of every host tensor, each at an 8-byte boundary (so it is read in place,
   with its own dtype).

A buffer of at most :data:`SLOT` bytes is one transfer: every stream keeps a receive of
that size posted (gloo fills a larger receive with a shorter message); a longer one
travels as its first :data:`SLOT` bytes and the rest. Tensors on an accelerator travel
apart, on the device, packed the same way into one buffer there, over a process group of
the device's backend (NCCL): one group per direction of each pair of stages, so that two
stages sending to each other at once never queue behind each other on one device stream
(:meth:`.Topology.payload_groups`). The host buffer says how many bytes follow there.

Nothing is pickled. A thread per incoming stream receives whole messages, in order, and
queues them; the model's thread decodes them into a *mailbox* keyed by ``(trace, key)``,
so the order in which its mediators ask does not matter. Sends are asynchronous (on
copies, so later in-place edits do not race them) and completed at the end of each
trace, whose end every rank announces on each of its streams (:meth:`Router.end_trace`).

A value served at a location the engine itself sends on (:attr:`Router.carried`: the
hidden states at a stage boundary, the logits) is held until the engine's send; when the
engine sends that very tensor, unchanged, the served value rides on the engine's message
(its key listed there) instead of travelling twice.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import queue
import struct
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
    if not torch._C._len_torch_dispatch_stack():
        return contextlib.nullcontext()  # no mode: nothing to leave (the common case, per message)
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


#: Bytes of the receive every stream keeps posted: a message up to this size is one transfer.
SLOT = 1 << 16
_HEADER = 4 * 8
_ALIGN = 8


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_CPU = torch.device("cpu")
_PADS = {n: torch.zeros(n, dtype=torch.uint8) for n in range(1, _ALIGN)}
_SIZES = {name: torch.empty((), dtype=d).element_size() for name, d in _DTYPES.items()}


def _pieces(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The bytes of ``tensors`` as flat ``uint8`` tensors on ``device``, each followed by the
    padding that puts the next at an 8-byte boundary (concatenated, they are a message's
    payload: the copy that protects it from later in-place edits)."""
    pieces = []
    for t in tensors:
        if t.requires_grad:
            t = t.detach()
        if t.device != device:
            t = t.to(device)
        pieces.append(t.contiguous().view(-1).view(torch.uint8))
        pad = -_nbytes(t) % _ALIGN
        if pad:
            pieces.append(_PADS[pad].to(device))
    return pieces


def _unpack(buffer: torch.Tensor, offset: int, specs: list) -> list[torch.Tensor]:
    """The tensors of a payload (see :func:`_pieces`; ``specs``: ``[dtype, shape]``) from
    ``offset`` of the byte ``buffer`` on, each a copy with a storage of its own (views of
    one buffer would share it across dtypes, which ``torch.save`` refuses)."""
    found = []
    for dtype, shape in specs:
        n = math.prod(shape) * _SIZES[dtype]
        found.append(buffer[offset:offset + n].view(_DTYPES[dtype]).view(shape).clone())
        offset += _aligned(n)
    return found


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
    """A daemon thread that waits on sends, in order, and marks their completions.

    gloo reports a send as completed only once someone waits on it; this thread waits so
    the model's thread never blocks. It touches no tensor.
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
    """One incoming stream: a thread of its own receives its messages, whole and in order
    (header and meta, host bytes, device bytes), and queues them for the model's thread.

    The thread always has a receive posted until the peer says goodbye, so a message never
    lands in a receive meant for another; it allocates the buffers and decodes nothing.
    """

    def __init__(self, peer: int, group: Any, arrived: threading.Event, device_group: Any,
                 device: torch.device) -> None:
        self.peer = peer
        self.group = group
        self.device_group = device_group
        self.device = device
        self.arrived = arrived
        #: (trace, bytes of meta, buffer, device buffer or None), in stream order.
        self.messages: "collections.deque[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]" = \
            collections.deque()
        self.error: Optional[BaseException] = None
        #: Set once the peer said goodbye (or the stream broke): nothing is posted any more.
        self.ended = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            slot = torch.empty(SLOT, dtype=torch.uint8)
            work = dist.irecv(slot, src=self.peer, group=self.group)
            while True:
                work.wait()
                trace, meta, length, on_device = struct.unpack_from("<4q", slot.numpy())
                if trace == -1:
                    return
                body = slot
                if length > SLOT:
                    body = torch.empty(length, dtype=torch.uint8)
                    body[:SLOT] = slot
                    dist.irecv(body[SLOT:], src=self.peer, group=self.group).wait()
                device_bytes = None
                if on_device:
                    device_bytes = torch.empty(on_device, dtype=torch.uint8, device=self.device)
                    dist.irecv(device_bytes, src=self.peer, group=self.device_group).wait()
                self.messages.append((trace, meta, body[:length], device_bytes))
                # The next receive is posted before the model's thread is woken: then this
                # thread only blocks, and the two do not compete for the interpreter.
                slot = torch.empty(SLOT, dtype=torch.uint8)
                work = dist.irecv(slot, src=self.peer, group=self.group)
                self.arrived.set()
        except BaseException as e:  # reported to the model's thread by next()
            self.error = e
        finally:
            self.ended.set()
            self.arrived.set()

    def next(self) -> Optional[tuple]:
        """The next whole message, or None; the stream's error once its messages are taken."""
        if self.messages:
            return self.messages.popleft()
        if self.error is not None:
            raise self.error
        return None


class Router:
    """Streams to and from the other stages of this rank's replica (see the module docstring).

    ``device_groups`` (peer rank -> (group to it, group from it)) carries the tensors on
    ``device`` apart from the host buffer; without it every tensor travels in the host buffer.
    """

    def __init__(self, topo: Topology, failures: Failures, group: Any,
                 device_groups: Optional[dict[int, tuple[Any, Any]]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.topo = topo
        self.failures = failures
        self.group = group
        self.trace = 0
        self.peers = [topo.rank_of(s, topo.tp_rank) for s in range(topo.pp) if s != topo.pp_rank]
        self.device_groups = device_groups or {}
        self.device = device if device_groups else None
        #: Set whenever a message arrives on any stream or a send completes (wakes waits).
        self.arrived = threading.Event()
        self.incoming = {peer: _Incoming(peer, group, self.arrived, self.device_groups.get(peer, (None, None))[1],
                                         self.device or _CPU)
                         for peer in self.peers}
        self.sender = Waiter()
        self.mailbox: dict[tuple, tuple[int, Any]] = {}
        self.sends: list[tuple[int, list, list]] = []  # (destination, works, the buffers they send)
        self.messages = 0
        self.bytes = 0
        #: Messages and payload bytes sent in the current trace, by kind of key
        #: ("v" served values, "o" observed values, "h" hidden states, "logits", "p" attributes).
        self.traffic: dict[str, list[int]] = {}
        #: Locations whose values the engine sends on itself (set by the engine): a value
        #: served there is held until then (see :meth:`send`).
        self.carried: set[str] = set()
        #: destination -> [(key, value, a copy of it as served)] held for the engine's message.
        self.held: dict[int, list[tuple[tuple, Any, torch.Tensor]]] = {}
        #: Peers whose end of the current trace arrived (see :meth:`wait_ends`).
        self.ended: set[int] = set()
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

    def send(self, dst: int, key: tuple, value: Any, location: Optional[str] = None) -> None:
        """Queue ``value`` to rank ``dst`` under ``key`` (asynchronous; copies the tensors).

        ``location``: a served value at a location of :attr:`carried` is held (outside a
        stage-local trace and a trace that keeps autograd links); the engine's own send
        (``location`` naming what it sends) carries the held values that are that very tensor
        with the same bytes as when served, as extra keys. Any other send to ``dst`` sends the
        held values first, and so does every router wait before it blocks.

        The receiver takes messages in order, and resumes the mediators waiting on them in
        that order: so only the held values *after* the last one that cannot ride go on the
        engine's message; the earlier ones are sent before it, in the order they were served.
        """
        with _real_tensors():
            if key[0] == "v" and location in self.carried and self._can_hold(value):
                # A copy as served, in case the value changes before the engine's send.
                self.held.setdefault(dst, []).append((key, value, value.detach().clone()))
                return
            held = self.held.pop(dst, [])
            # Same bytes, not the version counter: ``h.data += 1`` edits without counting.
            rides = [location is not None and v is value and torch.equal(copy, value) for _, v, copy in held]
            first = next((i for i in range(len(held), 0, -1) if not rides[i - 1]), 0)
            for held_key, _, copy in held[:first]:
                self._send(dst, held_key, copy, [])
            self._send(dst, key, value, [list(held_key) for held_key, _, _ in held[first:]])

    def _can_hold(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and not self.stage_local and not self.graph \
            and not _shape_only(value) and not value.is_inference()

    def flush(self) -> None:
        """Send every held value now."""
        for dst in list(self.held):
            with _real_tensors():
                for key, _, copy in self.held.pop(dst):
                    self._send(dst, key, copy, [])

    def _send(self, dst: int, key: tuple, value: Any, aliases: list) -> None:
        tensors: list[torch.Tensor] = []
        structure = encode(value, tensors)
        unknown = sorted({str(t.dtype) for t in tensors if str(t.dtype) not in _DTYPES})
        if unknown:
            raise TypeError(f"{', '.join(unknown)} cannot travel between ranks (under {list(key)}): "
                            f"convert to one of {', '.join(sorted(_DTYPES))}")
        # An empty tensor has no bytes to send on the device: it travels in the host buffer.
        on_device = [t.device == self.device and t.numel() > 0 for t in tensors] if self.device is not None \
            else [False] * len(tensors)
        meta_dict = {"key": list(key), "value": structure,
                     "tensors": [[str(t.dtype), list(t.shape), d] for t, d in zip(tensors, on_device)]}
        if aliases:
            meta_dict["also"] = aliases
        tracked = [i for i, t in enumerate(tensors) if t.requires_grad] if self.graph else []
        if tracked:
            meta_dict["grad"] = tracked
            self.outgoing[(dst, key)] = {i: tensors[i] for i in tracked}
        meta = json.dumps(meta_dict).encode()
        # One buffer: the header, the meta, then every host tensor's bytes; the device's
        # tensors in one buffer there.
        host = [t for t, d in zip(tensors, on_device) if not d]
        device = [t for t, d in zip(tensors, on_device) if d]
        device_bytes = torch.cat(_pieces(device, self.device)) if device else None
        pieces = _pieces(host, _CPU)
        length = _HEADER + _aligned(len(meta)) + sum(p.numel() for p in pieces)
        head = struct.pack("<4q", self.trace, len(meta), length, 0 if device_bytes is None else device_bytes.numel())
        head = bytearray(head + meta + b" " * (-len(meta) % _ALIGN))
        buffer = torch.cat([torch.frombuffer(head, dtype=torch.uint8)] + pieces) if pieces else \
            torch.frombuffer(head, dtype=torch.uint8)
        if length <= SLOT:
            works = [dist.isend(buffer, dst=dst, group=self.group)]
        else:
            works = [dist.isend(buffer[:SLOT], dst=dst, group=self.group),
                     dist.isend(buffer[SLOT:], dst=dst, group=self.group)]
        if device_bytes is not None:
            works.append(dist.isend(device_bytes, dst=dst, group=self.device_groups[dst][0]))
        # gloo moves the bytes by itself; the works are waited for together at the end of
        # the trace (:meth:`complete_sends`), so no thread wakes up per message.
        self.sends.append((dst, works, [head, buffer, device_bytes]))
        if key[0] == "end":
            return  # the end of a trace is no traffic
        self.messages += 1
        size = sum(_nbytes(t) for t in tensors)
        self.bytes += size
        count = self.traffic.setdefault(key[0], [0, 0])
        count[0] += 1
        count[1] += size

    def broadcast(self, key: tuple, value: Any, to: Optional[list[int]] = None,
                  location: Optional[str] = None) -> None:
        """:meth:`send` to every peer (or to ``to``)."""
        for peer in self.peers if to is None else to:
            self.send(peer, key, value, location)

    def complete_sends(self, wait: bool = True) -> None:
        """Wait until every queued send has left (bounded by the timeout).

        ``wait=False`` when every receiver is known to take them before this rank goes on
        (it waits for this rank's end of trace, which follows them, before the barrier that
        ends the trace): their works are then only handed to the waiter thread.
        """
        self.flush()
        if not self.sends:
            return
        completion = self.sender.watch([work for _, works, _ in self.sends for work in works], self.arrived)
        receivers = sorted({dst for dst, _, _ in self.sends})
        source = f"rank{'s' if len(receivers) > 1 else ''} {', '.join(map(str, receivers))}"
        self.sends.clear()
        if wait:
            self.failures.wait(lambda: lost_contact(completion.done, -1), "the receipt of its sends", source,
                               self.poll, self._idle)

    def end_trace(self) -> None:
        """Tell every peer that this trace sends nothing more on its stream (see :meth:`wait_ends`)."""
        self.broadcast(("end", self.topo.rank), None)

    def wait_ends(self) -> None:
        """A router-aware wait until every peer's :meth:`end_trace` arrived: the streams are
        in order, so every message of this trace has then arrived (and been delivered)."""
        for peer in self.peers:
            if peer not in self.ended:
                self.wait(("end", peer), "the end of the trace", peer)
                self.ended.add(peer)

    # ------------------------------------------------------------------ receiving

    def poll(self, until: Optional[Callable[[], bool]] = None) -> bool:
        """Deliver the messages that have arrived, in stream order; True if there was any.

        With ``until``, stop as soon as it holds: a wait takes in exactly the messages up to
        the one it waits for, so what it delivers (and what the mediators it resumes do, tp
        collectives included) depends on the streams' contents, not on their timing, and
        is the same on every tensor-parallel rank of the stage.
        """
        got = False
        for stream in self.incoming.values():
            while not (until is not None and until()):
                message = lost_contact(stream.next, stream.peer)
                if message is None:
                    break
                self._deliver(stream.peer, *message)
                got = True
        return got

    def _deliver(self, peer: int, trace: int, size: int, body: torch.Tensor,
                 device_bytes: Optional[torch.Tensor]) -> None:
        if trace < self.trace:
            return  # left over from a trace that already ended (it failed): nobody wants it
        with _real_tensors():  # the buffers are real; a scan's shape-only values decode below, as fakes
            meta = json.loads(body.numpy()[_HEADER:_HEADER + size].tobytes())
            specs = meta["tensors"]
            tensors = []
            if specs:
                host = iter(_unpack(body, _HEADER + _aligned(size), [s[:2] for s in specs if not s[2]]))
                on_device = iter(_unpack(device_bytes, 0, [s[:2] for s in specs if s[2]])
                                 if device_bytes is not None else ())
                tensors = [next(on_device) if s[2] else next(host) for s in specs]
                device = self.topo.device
                if device.type != "cpu":
                    tensors = [t if t.device == device else t.to(device) for t in tensors]
        key = tuple(_tuple(k) for k in meta["key"])
        if meta.get("grad"):
            tensors = self._tracked(trace, peer, key, tensors, meta["grad"])
        value = decode(meta["value"], tensors)
        # Served values that rode on this message arrive before it, as they were served;
        # each gets its own copy (the engine computes on this one).
        for alias in [tuple(_tuple(k) for k in also) for also in meta.get("also", ())] + [key]:
            got = value if alias is key else value.clone()
            self.mailbox[(trace, alias)] = (peer, got)
            if trace == self.trace and self.on_message is not None:
                self.on_message(peer, alias, got)

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

    def take(self, key: tuple) -> tuple[bool, Any]:
        """The value under ``key`` in this trace's mailbox (removed), if it arrived."""
        item = self.mailbox.pop((self.trace, key), None)
        return (False, None) if item is None else (True, item[1])

    def wait(self, key: tuple, what: str, source: int, engine: bool = False) -> Any:
        """A router-aware wait: deliver arrivals (serving them) until ``key`` arrives
        (``engine``: one of the engine's own transfers, see :meth:`.Failures.wait`)."""
        def arrived() -> bool:
            return (self.trace, key) in self.mailbox

        self.failures.wait(arrived, what, source, lambda: self.poll(arrived), self._idle, engine)
        return self.take(key)[1]

    def _idle(self, seconds: float) -> None:
        """Send the held values (a peer may need one to answer: an ad-hoc call's result served
        at a carried location, say), then sleep until a message arrives on any stream or a
        send completes, or ``seconds``."""
        self.flush()
        if self.arrived.wait(seconds):
            self.arrived.clear()

    def close(self, seconds: float = 10.0) -> None:
        """Say goodbye on every stream and wait for the peers' goodbyes (at exit).

        A receive still posted when the process group is torn down aborts the process; the
        goodbyes end every stream's thread first. Best effort: a dead peer is given up on.
        """
        if self.closed or not dist.is_initialized():
            return
        self.closed = True
        bye = torch.tensor([-1, 0, 0, 0], dtype=torch.long).view(torch.uint8)
        try:
            sent = self.sender.watch([dist.isend(bye, dst=peer, group=self.group) for peer in self.peers])
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not (
                    sent.done() and all(s.ended.is_set() for s in self.incoming.values())):
                time.sleep(0.001)
        except (RuntimeError, dist.DistError):
            pass

    def next_trace(self) -> None:
        """Start a new trace: forget what is left of the last one."""
        self.trace += 1
        self.failures.begin(self.trace)
        self.mailbox = {k: v for k, v in self.mailbox.items() if k[0] >= self.trace}
        self.held = {}
        self.ended = set()
        self.outgoing = {}
        self.leaves = {k: v for k, v in self.leaves.items() if k[0] >= self.trace}
        self.traffic = {}
        self.messages = 0
        self.bytes = 0


def _tuple(k: Any) -> Any:
    return tuple(_tuple(x) for x in k) if isinstance(k, list) else k
