"""Divergence: how the ranks of a replica find out they ran different things.

Under SPMD every rank of a replica runs the same body on the same values; a body that
branches on the rank, or a value described as whole that is in fact a fragment, breaks
that silently. Three checks turn it into a :class:`DivergenceError`: the input digest
before the model runs and the end-of-trace digest of what was served (both in
:mod:`.replica`, which uses :func:`digest` and :func:`first_difference`), and *check
mode* (:class:`CheckMode`, ``NNSIGHT_DIST_CHECK=1``), which compares every value served
as whole across the tensor-parallel group.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from ..intervention.batcher import tensors
from ..intervention.errors import DivergenceError
from .exchange import all_gather_json
from .failure import Failures
from .router import _shape_only
from .topology import Topology


def digest(found: list[torch.Tensor]) -> int:
    """A signed 64-bit blake2b digest of the dtypes, shapes and bytes of tensors."""
    h = hashlib.blake2b(digest_size=8)
    for t in found:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def first_difference(ranks: list[int], logs: list[list]) -> str:
    """The first entry where the served logs (``[mediator, request, location]`` entries,
    one log per rank of ``ranks``) differ, said for a :class:`DivergenceError`."""
    reference = logs[0]
    for rank, log in zip(ranks[1:], logs[1:]):
        for i in range(max(len(reference), len(log))):
            a = reference[i] if i < len(reference) else None
            b = log[i] if i < len(log) else None
            if a != b:
                def say(e):
                    return "nothing" if e is None else f"{e[2]} (mediator {e[0]}, request {e[1]})"
                return (f"ranks diverged: entry {i} is {say(a)} on rank {ranks[0]} but {say(b)} on rank {rank}; "
                        "the intervention code must be the same on every rank (no branching on the rank)")
    return "ranks diverged in what they served"


class CheckMode:
    """``NNSIGHT_DIST_CHECK=1``: every value served as whole must be bit-identical on every
    rank of the tensor-parallel group (read per trace, in :meth:`begin`)."""

    def __init__(self, topo: Topology, failures: Failures) -> None:
        self.topo = topo
        self.failures = failures
        self.checking = False
        self._checks: list = []

    def begin(self) -> None:
        """A trace starts: read the switch, forget the last trace's digests."""
        self.checking = os.environ.get("NNSIGHT_DIST_CHECK", "") not in ("", "0")
        self._checks = []

    def compares(self) -> bool:
        """Whether this trace ends with the ranks' comparison (:meth:`compare`)."""
        return self.checking and self.topo.tp > 1

    def verify(self, location: str, value: Any) -> None:
        """``value`` was served as whole at ``location``: keep a digest of its tensors. The
        ranks compare theirs when the trace closes (:meth:`compare`): one exchange per trace,
        and ranks that ran different code still reach the divergence report instead of
        waiting in mismatched collectives."""
        if not self.compares():
            return
        found = tensors(value)
        if found and not any(_shape_only(t) for t in found):  # a scan's tensors have no data
            self._checks.append([location, digest(found)])

    def compare(self) -> None:
        """Raise :class:`DivergenceError` naming the first whole value whose digests differ
        between the ranks of the tensor-parallel group, and which ranks hold which."""
        if not self.compares():
            return
        logs = all_gather_json(self._checks, self.topo.group("tp"), self.topo.tp, self.failures)
        ranks = self.failures.members("tp")
        for i in range(max(len(log) for log in logs)):
            entries = [tuple(log[i]) if i < len(log) else None for log in logs]
            if len(set(entries)) == 1:
                continue
            groups: dict[Any, list[int]] = {}
            for rank, entry in zip(ranks, entries):
                groups.setdefault(entry, []).append(rank)
            location = next(e[0] for e in entries if e is not None)
            raise DivergenceError(
                f"check mode: {location} was served as the whole value (check {i} of the trace) but differs "
                f"between the ranks of its tensor-parallel group ({' vs '.join(map(str, groups.values()))} "
                "hold different values): a fragment described as whole, or an edit that depends on the rank"
            )
