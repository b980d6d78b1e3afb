"""Exchanges outside the router: objects over the world, JSON and sharded caches in a replica.

Structure travels as JSON bytes in uint8 tensors, values as raw tensors; nothing is
pickled. The replica's exchanges (the divergence report, :func:`gather_cache`) are guarded
by :class:`~.failure.Failures` (timeout, remote errors).

:func:`gather_object` and :func:`broadcast_object` are the user's exchanges over the whole
world, outside any trace. Each call begins with one all-gather of a small header (which
call, which root, the message size or a failure), so every rank learns at once when the
ranks made different calls or one rank's value cannot be sent, and raises the same error;
then the messages move (a JSON description and the raw bytes of every tensor). Every wait
is bounded by the topology's timeout. A call that some rank never makes ends in
:class:`RouterTimeout` naming those ranks; the world's exchanges are then out of step, so
the rank publishes that in the job's store and every later call, on any rank, raises at
once instead of pairing with a stale message.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..intervention.errors import DivergenceError, RemoteError, RouterTimeout, TopologyError, UnsendableObject
from .failure import Failures, lost_contact
from .placement import assemble
from .router import _DTYPES, _shape_only, decode, encode
from .topology import Topology, current, discover


def all_gather_json(obj: Any, group: Any, n: int, failures: Failures, what: str = "the divergence report") -> list:
    """Every rank's JSON-able ``obj`` (``n`` ranks in ``group``), in group order; a timeout
    names ``what`` was awaited."""
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(n)]
    failures.wait_work(dist.all_gather(sizes, torch.tensor([payload.numel()]), group=group, async_op=True),
                       what, "the replica")
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(n)]
    failures.wait_work(dist.all_gather(parts, padded, group=group, async_op=True), what, "the replica")
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes)]


def gather_cache(topo: Topology, failures: Failures, cache: Any, placements: dict, dst: int = 0) -> Any:
    """Assemble a sharded cache of the replica on its ``dst``-th rank (``None`` elsewhere).

    Each rank holds what it owns, tensor-parallel fragments as they are; fragments are
    concatenated along their shard dimension (or summed when partial) in tensor-parallel
    order. Every rank of the replica must call this.
    """
    from ..intervention.cache import Cache, _Visits

    ranks = topo.replica_ranks()
    _check_root("cache.gather", "dst", dst, len(ranks), "ranks of the replica (the replica's dst-th rank receives it)")
    group = topo.group("replica")
    tensors: list[torch.Tensor] = []
    mine = []
    for path, entry in dict.items(cache):
        for key in ("output", "inputs"):
            value = getattr(entry, key)
            if value is not None:
                visits = isinstance(value, _Visits)
                mine.append([path, key, visits, placements.get((path, key), "whole"),
                             encode(list(value) if visits else value, tensors)])
    shapes = [[str(t.dtype), list(t.shape)] for t in tensors]
    metas = all_gather_json({"entries": mine, "tensors": shapes, "dst": dst}, group, len(ranks), failures,
                            "cache.gather on the other ranks (every rank of the replica must call it)")
    dsts = [meta["dst"] for meta in metas]
    if len(set(dsts)) > 1:
        raise DivergenceError(f"cache.gather was called with different dst on the ranks of the replica "
                              f"({', '.join(f'rank {r}: dst={d}' for r, d in zip(ranks, dsts))}): every rank "
                              "must call it with the same dst")
    target = ranks[dst]
    if topo.rank != target:
        for t in tensors:
            _wait_p2p(dist.isend(t.contiguous(), dst=target, group=group), topo, "cache.gather's delivery to", target)
        return None
    received: list[list[torch.Tensor]] = []
    for rank, meta in zip(ranks, metas):
        if rank == topo.rank:
            received.append(tensors)
            continue
        got = []
        for dtype, shape in meta["tensors"]:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
            _wait_p2p(dist.irecv(t, src=rank, group=group), topo, "cache.gather's fragments from", rank)
            got.append(t)
        received.append(got)
    pieces: dict[tuple[str, str], list[tuple[int, Any, bool]]] = {}
    for rank, meta, got in zip(ranks, metas, received):
        for path, key, visits, placement, structure in meta["entries"]:
            pieces.setdefault((path, key), []).append((rank, decode(structure, got), visits, placement))
    whole = Cache(device=None, detach=False)
    for (path, key), parts in pieces.items():
        placement = parts[0][3]  # as the owner recorded it (other stages see a remote location)
        parts.sort(key=lambda p: p[0])
        values = [p[1] for p in parts]
        if parts[0][2]:
            for visit in range(len(values[0])):
                whole.add(path, key, assemble([v[visit] for v in values], placement, key == "inputs", f"{path}.{key}"))
        else:
            whole.add(path, key, assemble(values, placement, key == "inputs", f"{path}.{key}"))
    return whole.cache


# ---------------------------------------------------------------------- objects over the world

_GATHER, _BROADCAST = 1, 2
_NAMES = {_GATHER: ("nd.gather_object", "dst"), _BROADCAST: ("nd.broadcast_object", "src")}
_BROKEN = "nnsight_dist/objects/broken"


def _wait_p2p(work: Any, topo: Topology, what: str, peer: int) -> None:
    """Wait for a point-to-point ``work`` (gloo reports one completed only to a waiter, so it
    is waited on, not polled), at most the topology's timeout."""
    try:
        work.wait(timedelta(seconds=topo.timeout))
    except (RuntimeError, dist.DistError) as e:
        raise RouterTimeout(f"rank {topo.rank} waited for {what} rank {peer}, which failed or never came "
                            f"within {topo.timeout:g} s ({e})") from e


def gather_object(obj: Any, dst: int = 0) -> Optional[list]:
    """Every rank's ``obj``, in rank order, on rank ``dst``; ``None`` on the other ranks.

    ``obj`` may hold tensors and JSON values (``None``, bools, numbers, strings) in lists,
    tuples and dicts (keys: strings, numbers, ``None`` or tuples of them); it arrives as
    such, tensors on the CPU and detached, dict subclasses as plain dicts. Anything else
    raises :class:`UnsendableObject` on every rank, naming the sending rank and where the
    value is. Every rank must make the same call (same ``dst``): ranks that make another
    call raise :class:`DivergenceError`, and a call some rank never makes
    :class:`RouterTimeout` after the timeout. In one process, the list of ``obj`` after the
    same checks and copies.
    """
    return _exchange(_GATHER, obj, dst)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the other ranks' ``obj`` is ignored).

    What may travel and the errors are those of :func:`gather_object`.
    """
    return _exchange(_BROADCAST, obj, src)


def _exchange(kind: int, obj: Any, root: int) -> Any:
    name, arg = _NAMES[kind]
    topo = current()
    launched = discover().world_size if topo is None else 1
    if launched > 1:
        raise TopologyError(f"{name} was called before nd.init on a launch of {launched} ranks: "
                            "call nd.init(...) (or build the nd.LanguageModel) first, on every rank")
    world = topo.world_size if topo is not None else 1
    _check_root(name, arg, root, world, "ranks in the world")
    sending = kind == _GATHER or topo is None or topo.rank == root
    meta, tensors, problem = b"", [], ""
    if sending:
        try:
            structure = _pack(obj, tensors, "obj")
            shapes = [[str(t.dtype), list(t.shape)] for t in tensors]
            meta = json.dumps({"value": structure, "tensors": shapes}).encode()
        except UnsendableObject as e:
            problem = str(e)
    if topo is None or not topo.distributed:
        if problem:
            raise UnsendableObject(f"{name}: {problem}")
        value = _unpack(meta, _bytes(meta, tensors))
        return [value] if kind == _GATHER else value
    return _Call(topo, kind, root).run(meta, tensors, problem)


def _check_root(name: str, arg: str, root: Any, n: int, what: str) -> None:
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < n:
        raise TopologyError(f"{name}({arg}={root!r}): {arg} must be one of the {n} {what}, 0 to {n - 1}")


class _Call:
    """One distributed :func:`gather_object` / :func:`broadcast_object` call on this rank."""

    def __init__(self, topo: Topology, kind: int, root: int) -> None:
        self.topo, self.kind, self.root = topo, kind, root
        self.group = topo.group("world")
        self.store = dist.distributed_c10d._get_default_store()
        topo.exchanges += 1
        self.number = topo.exchanges
        self.name, arg = _NAMES[kind]
        self.call = f"{self.name}({arg}={root})"

    def run(self, meta: bytes, tensors: list[torch.Tensor], problem: str) -> Any:
        self._check_broken()
        lost_contact(lambda: self.store.set(self._arrived(self.topo.rank), self.call), "the job's store")
        if self.number > 2:  # every rank is past call n - 2: its arrival marks are not read again
            lost_contact(lambda: self.store.delete_key(self._arrived(self.topo.rank, self.number - 2)),
                         "the job's store")
        body = _bytes(meta, tensors)
        said = problem.encode()
        # (call, root, bytes of meta or -1 when the value cannot be sent, bytes of the message or of the reason)
        header = torch.tensor([self.kind, self.root, -1 if problem else len(meta),
                               len(said) if problem else body.numel()])
        headers = [torch.zeros(4, dtype=torch.long) for _ in range(self.topo.world_size)]
        self._wait(dist.all_gather(headers, header, group=self.group, async_op=True), "the call's header")
        calls = [(int(h[0]), int(h[1])) for h in headers]
        if len(set(calls)) > 1:
            made = ", ".join(f"rank {r}: {_NAMES[k][0]}({_NAMES[k][1]}={root})" if k in _NAMES else f"rank {r}: ?"
                             for r, (k, root) in enumerate(calls))
            raise DivergenceError(f"the ranks made different exchange calls ({made}): every rank must make the "
                                  "same nd.gather_object / nd.broadcast_object calls, with the same dst / src, "
                                  "in the same order")
        failed = [r for r, h in enumerate(headers) if int(h[2]) < 0 and (self.kind == _GATHER or r == self.root)]
        if failed:
            raise UnsendableObject(self._problems(failed, headers, said))
        if self.kind == _BROADCAST:
            size = int(headers[self.root][3])
            if self.topo.rank != self.root:
                body = torch.empty(size, dtype=torch.uint8)
            self._wait(dist.broadcast(body, src=self.root, group=self.group, async_op=True), "the value", self.root)
            return _unpack(body[: int(headers[self.root][2])].numpy().tobytes(), body)
        if self.topo.rank != self.root:
            self._wait(dist.isend(body, dst=self.root, group=self.group), "the value's delivery", self.root)
            return None
        values = []
        for r, h in enumerate(headers):
            got = body
            if r != self.root:
                got = torch.empty(int(h[3]), dtype=torch.uint8)
                self._wait(dist.irecv(got, src=r, group=self.group), "the value", r)
            values.append(_unpack(got[: int(h[2])].numpy().tobytes(), got))
        return values

    def _problems(self, failed: list[int], headers: list[torch.Tensor], said: bytes) -> str:
        """Every rank's reason for the failed ranks (one all-gather of their messages)."""
        width = max(int(headers[r][3]) for r in failed)
        padded = torch.zeros(width, dtype=torch.uint8)
        if self.topo.rank in failed:
            padded[: len(said)] = torch.frombuffer(bytearray(said), dtype=torch.uint8)
        parts = [torch.zeros(width, dtype=torch.uint8) for _ in headers]
        self._wait(dist.all_gather(parts, padded, group=self.group, async_op=True), "the failed ranks' reasons")
        reasons = "; ".join(f"rank {r}: {parts[r][: int(headers[r][3])].numpy().tobytes().decode()}" for r in failed)
        return f"{self.call} could not send the value of rank(s) {failed}: {reasons}"

    def _arrived(self, rank: int, number: Optional[int] = None) -> str:
        return f"nnsight_dist/objects/{self.number if number is None else number}/{rank}"

    def _check_broken(self) -> None:
        """Raise when an earlier call timed out somewhere: the ranks' exchanges are out of step."""
        if not lost_contact(lambda: self.store.check([_BROKEN]), "the job's store"):
            return
        data = json.loads(lost_contact(lambda: self.store.get(_BROKEN), "the job's store").decode())
        said = (f"{data['message']}; the ranks' nd.gather_object / nd.broadcast_object calls are out of step "
                "since, so no later call can pair up: restart the job")
        if data["rank"] == self.topo.rank:
            raise RouterTimeout(f"{self.call} cannot run: {said}")
        raise RemoteError(data["rank"], said)

    def _wait(self, work: Any, what: str, peer: Optional[int] = None) -> None:
        """Wait for ``work``; the world group's own timeout (the topology's) bounds it."""
        try:
            work.wait(timedelta(seconds=self.topo.timeout))
        except (RuntimeError, dist.DistError) as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                self._timed_out(what, peer)
            raise RemoteError(-1 if peer is None else peer,
                              f"lost contact during {self.call} ({e}); the rank probably died") from e

    def _timed_out(self, what: str, peer: Optional[int]) -> None:
        try:
            absent = [r for r in range(self.topo.world_size) if not self.store.check([self._arrived(r)])]
        except (RuntimeError, dist.DistError):
            absent = []  # the store is gone with its host rank
        if absent:
            why = (f"rank(s) {absent} never made this call (call {self.number} of this rank): every rank must make "
                   "the same nd.gather_object / nd.broadcast_object calls in the same order (a branch on the rank?), "
                   "or the others are still busy (raise the limit with nd.init(timeout=...) or NNSIGHT_DIST_TIMEOUT)")
        else:
            why = f"every rank made the call, but rank {peer if peer is not None else '?'} did not answer (did it die?)"
        message = f"rank {self.topo.rank} waited {self.topo.timeout:g} s in {self.call} for {what}: {why}"
        try:
            self.store.set(_BROKEN, json.dumps({"rank": self.topo.rank, "message": message}))
        except (RuntimeError, dist.DistError):
            pass  # the store is gone with its host rank: nobody can make a later call anyway
        raise RouterTimeout(message)


def _pack(value: Any, tensors: list[torch.Tensor], where: str) -> Any:
    """A JSON structure for ``value`` (its tensors appended to ``tensors``), or
    :class:`UnsendableObject` naming ``where`` the first value that cannot travel is."""
    if isinstance(value, torch.Tensor):
        tensors.append(_sendable_tensor(value, where))
        return {"__tensor__": len(tensors) - 1}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            if not _sendable_key(k):
                raise UnsendableObject(f"{where} has a key of type {type(k).__name__} ({k!r:.60}): keys may be "
                                       "strings, numbers, None or tuples of them")
            pairs.append([_pack(k, tensors, where), _pack(v, tensors, f"{where}[{k!r}]")])
        return {"__map__": pairs}
    raise UnsendableObject(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot travel "
                           f"between ranks (only tensors and JSON values, in lists, tuples and dicts; nothing is "
                           f"pickled): {_hint(value)}")


def _sendable_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_sendable_key(k) for k in key)
    return key is None or isinstance(key, (bool, int, float, str))


def _sendable_tensor(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t`` as it travels (detached, on the CPU, contiguous), or :class:`UnsendableObject`."""
    if hasattr(t, "full_tensor"):
        raise UnsendableObject(f"{where} is a DTensor (a tensor-parallel parameter's shard): send "
                               "t.full_tensor() (every rank of its group must call it) or t.to_local()")
    if _shape_only(t):
        raise UnsendableObject(f"{where} is a tensor without data (from a scan, or on the meta device): "
                               "send its shape, list(t.shape), or a real tensor")
    if t.layout != torch.strided:
        raise UnsendableObject(f"{where} is a {t.layout} tensor: send t.to_dense()")
    if str(t.dtype) not in _DTYPES:
        raise UnsendableObject(f"{where} is a tensor of dtype {t.dtype}, which does not travel: convert it to one of "
                               f"{', '.join(sorted(_DTYPES))} (complex values as torch.view_as_real(t))")
    return t.detach().to("cpu").contiguous()


def _hint(value: Any) -> str:
    """What to send instead of ``value``."""
    if isinstance(value, (set, frozenset)):
        return "send sorted(s) or list(s)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "send b.decode() or torch.frombuffer(bytearray(b), dtype=torch.uint8)"
    if type(value).__module__ == "numpy":
        return "send torch.from_numpy(a) for an array, or int(x) / float(x) for a number"
    return "send its fields as a dict of tensors and JSON values, and rebuild it on the receiving rank"


def _bytes(meta: bytes, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One message: the meta's bytes, then every tensor's raw bytes."""
    parts = [torch.frombuffer(bytearray(meta), dtype=torch.uint8)] if meta else []
    parts += [t.reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _unpack(meta: bytes, body: torch.Tensor) -> Any:
    """The value of a message made by :func:`_bytes`."""
    data = json.loads(meta.decode())
    tensors, offset = [], len(meta)
    for dtype, shape in data["tensors"]:
        kind = _DTYPES[dtype]
        n = math.prod(shape) * torch.empty((), dtype=kind).element_size()
        tensors.append(body[offset:offset + n].clone().view(kind).view(shape))
        offset += n
    return _unpacked(data["value"], tensors)


def _unpacked(structure: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(structure, list):
        return [_unpacked(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__tuple__" in structure:
            return tuple(_unpacked(v, tensors) for v in structure["__tuple__"])
        return {_unpacked(k, tensors): _unpacked(v, tensors) for k, v in structure["__map__"]}
    return structure
