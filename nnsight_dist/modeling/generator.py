"""``model.generator``: the generated ids, and each step's tokens, as locations.

nnsight 0.8.1 passes what ``generate`` returns through an identity module, ``Generator``,
so the finished ids are the location ``model.generator.output``; its child ``Streamer`` is
handed to transformers' ``generate`` as its ``streamer``, which calls ``put`` with the
prompt's ids first and then with each step's new tokens, so ``model.generator.streamer.output``
is visited once for the prompt and once per new token (``tracer.iter[i]`` reads visit
``i``). Neither module is part of the model: they are not in ``model.modules()`` nor in
``print(model)``.

Reading ``model.generator.output`` warns (``FutureWarning``) as in nnsight, which
deprecates it for ``tracer.result``, the same ids.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..intervention.envoy import Envoy


class Passthrough(torch.nn.Module):
    """Identity module: its output is its (first) input, so the value becomes a location."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 else args


class Streamer(Passthrough):
    """transformers' streamer protocol: ``put(tokens)`` is a call of this module."""

    def put(self, value: Any) -> Any:
        return self(value)

    def end(self) -> None:
        return None


class Generator(Passthrough):
    """The module the generated ids pass through; ``streamer`` receives each step's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = Streamer()


_DEPRECATED = (
    "model.generator.output is deprecated; use tracer.result instead "
    "(model.generator.streamer.output still gives per-step tokens)."
)


class GeneratorEnvoy(Envoy):
    """The envoy of :class:`Generator`: ``.output`` warns, as nnsight 0.8.1's does."""

    @property
    def output(self) -> Any:
        """The generated ids (deprecated in nnsight for ``tracer.result``)."""
        warnings.warn(_DEPRECATED, FutureWarning, stacklevel=2)
        return Envoy.output.__get__(self, type(self))

    @output.setter
    def output(self, value: Any) -> None:
        warnings.warn(_DEPRECATED, FutureWarning, stacklevel=2)
        Envoy.output.__set__(self, value)
