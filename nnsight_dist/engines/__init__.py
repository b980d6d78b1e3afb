"""Engines: the libraries that shard and run a model, each described for nnsight_dist.

An engine is a module of this package that implements :class:`.protocol.Engine`: it
*loads* this rank's part of a checkpoint, *describes* the placement of every module (and
of every tensor-parallel parameter), and names its *blocking points* (where one pipeline
stage waits on another), which it puts on the router. Nothing outside ``engines/`` knows
an engine's classes. :func:`get` returns the engine of a name; see ``docs/engines.md``.
"""

from __future__ import annotations

import importlib

#: ``engine=`` names and the module of this package implementing each.
MODULES = {"transformers": "transformers", "deepspeed": "deepspeed", "torch": "torch_tp"}


def get(name: str):
    """The engine called ``name`` (a module implementing :class:`.protocol.Engine`);
    ``ValueError`` for a name no engine has."""
    if name not in MODULES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(MODULES)}")
    return importlib.import_module(f"{__name__}.{MODULES[name]}")
