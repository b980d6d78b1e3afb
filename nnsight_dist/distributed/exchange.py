"""Exchanges between the ranks of a replica outside the router: JSON and sharded caches.

Structure travels as JSON bytes in uint8 tensors, values as raw tensors; nothing is
pickled. Every wait is guarded by :class:`~.failure.Failures` (timeout, remote errors).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from .failure import Failures
from .placement import assemble
from .router import decode, encode
from .topology import Topology


def all_gather_json(obj: Any, group: Any, n: int, failures: Failures) -> list:
    """Every rank's JSON-able ``obj`` (``n`` ranks in ``group``), in group order."""
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(n)]
    failures.wait_work(dist.all_gather(sizes, torch.tensor([payload.numel()]), group=group, async_op=True),
                       "the divergence report", "the replica")
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(n)]
    failures.wait_work(dist.all_gather(parts, padded, group=group, async_op=True), "the divergence report", "the replica")
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes)]


def gather_cache(topo: Topology, failures: Failures, cache: Any, placements: dict, dst: int = 0) -> Any:
    """Assemble a sharded cache of the replica on its ``dst``-th rank (``None`` elsewhere).

    Each rank holds what it owns, tensor-parallel fragments as they are; fragments are
    concatenated along their shard dimension (or summed when partial) in tensor-parallel
    order. Every rank of the replica must call this.
    """
    from ..intervention.cache import Cache, _Visits

    ranks = topo.replica_ranks()
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
    metas = all_gather_json({"entries": mine, "tensors": shapes}, group, len(ranks), failures)
    target = ranks[dst]
    if topo.rank != target:
        for t in tensors:
            dist.send(t.contiguous(), dst=target, group=group)
        return None
    from .router import _DTYPES

    received: list[list[torch.Tensor]] = []
    for rank, meta in zip(ranks, metas):
        if rank == topo.rank:
            received.append(tensors)
            continue
        got = []
        for dtype, shape in meta["tensors"]:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
            dist.recv(t, src=rank, group=group)
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
