"""The engine protocol: what nnsight_dist asks of a library that shards and runs a model.

An engine is a module with the functions and attributes of :class:`Engine`. It answers
from the loaded model (its module classes, its DTensor placements, its layer split), never
by guessing from shapes; whatever it cannot describe it leaves out, and values it leaves
out are refused rather than shown (a fragment never passes as the whole value).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from ..distributed.placement import Placement
from ..distributed.topology import Topology


class Engine(Protocol):
    """One engine (see ``docs/engines.md`` for a worked example of adding one)."""

    #: The ``engine=`` name.
    name: str
    #: Why a trace cannot call backward on this engine's sharded model (its collectives
    #: carry no gradient, say), or ``None`` when it can.
    backward_refused: Optional[str]

    def check(self, config: Any, tp: int, pp: int) -> None:
        """Raise :class:`~..intervention.errors.UnshardableModel`, before anything is loaded,
        when ``tp``/``pp`` cannot split the model of ``config`` on this engine."""

    def load(self, path: str, topo: Topology, **kwargs: Any) -> torch.nn.Module:
        """This rank's part of the checkpoint at ``path``, sharded ``topo.pp × topo.tp``
        within this rank's replica (``kwargs``: ``from_pretrained`` keywords). Every rank's
        module tree has the same paths: modules of other stages are placeholders that pass
        their input through, so every rank visits the same locations."""

    def placements(self, model: torch.nn.Module, topo: Topology, root: str = "model") -> dict[str, Placement]:
        """The :class:`Placement` of every module of ``model`` (paths prefixed with
        ``root``): owner stage, ranks, input and output placement (each element of a tuple
        output included), and the placement of each parameter the engine holds as a plain
        tensor fragment (``Placement.parameters``)."""

    def opaque_types(self, topo: Topology) -> tuple[type, ...]:
        """Types of objects that hold tensor-parallel fragments in a structure no codec
        assembles (a key/value cache): values containing them are refused, not shown."""

    def attach_pipeline(self, model: torch.nn.Module, topo: Topology, interleaver: Any, router: Any,
                        root: str = "model") -> None:
        """Put the engine's blocking points (hidden states from the previous stage, logits
        from the last) on ``router`` as router-aware waits at ``interleaver.points``; nothing
        at ``pp == 1``."""
