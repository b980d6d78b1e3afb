"""The plan of a sharding, made before loading: where every module runs, what each rank holds.

:func:`plan` builds the model of a configuration on the meta device (no weights, no
process group, no ranks) and asks the engine the questions a loaded model answers: its
checks (:func:`~.transformers.check` refuses degrees that do not split the model), its
placements (:func:`~.transformers.placements`, the table ``model.placements()`` shows on
the ranks) and how it shards each parameter (:func:`~.transformers.parameter_shards`).
The result is data (:class:`Plan`): printed, it is a table grouping repeated layers, with
the bytes each rank holds and the activation bytes per token.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..distributed.placement import Placement, shard_dim
from ..distributed.topology import Topology, _degree
from . import transformers as engine

GIB = 1024 ** 3


@dataclass(frozen=True)
class Plan:
    """A model's sharding over ``pp × tp`` ranks (one replica), computed from its configuration.

    ``placements``: every module path's :class:`Placement` (as ``model.placements()``);
    ``parameter_bytes``: rank -> bytes of the parameters it holds (its stage's, the
    tensor-parallel ones its slice of); ``activations``: bytes per token of one layer's
    values on one rank: ``hidden_states`` (whole on every rank) and ``intermediate`` (the
    widest other value inside a layer on one rank, with its ``path``).
    """

    model_type: str
    tp: int
    pp: int
    dtype: torch.dtype
    placements: dict[str, Placement]
    parameter_bytes: dict[int, int]
    stage_layers: dict[int, tuple[int, int]]
    activations: dict[str, Any]

    def to_json(self) -> dict:
        """The plan as JSON-ready data (placements per path, bytes per rank)."""
        return {
            "model_type": self.model_type, "tp": self.tp, "pp": self.pp, "dtype": str(self.dtype).removeprefix("torch."),
            "placements": {p: {"owner_stage": v.owner_stage, "ranks": list(v.ranks), "input": v.input,
                               "output": v.output} for p, v in self.placements.items()},
            "parameter_bytes": {str(r): b for r, b in self.parameter_bytes.items()},
            "stage_layers": {str(s): list(r) for s, r in self.stage_layers.items()},
            "activations": self.activations,
        }

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """The table's rows ``(path, stage, ranks, input, output)``, runs of layers with the
        same placements on the same stage written once as ``layers.{a..b}`` (grouped on a
        path's first index, the layer's)."""
        groups: dict[tuple, list[int]] = {}
        order: list[tuple] = []
        for path, p in self.placements.items():
            m = re.match(r"^(.*?\.)(\d+)((?:\..*)?)$", path)  # the first index: a layer's
            key = (m.group(1), m.group(3), p.owner_stage, p.input, p.output) if m else (path,)
            if key not in groups:
                groups[key] = []
                order.append(key)
            if m:
                groups[key].append(int(m.group(2)))
        rows = []
        for key in order:
            if len(key) == 1:
                p = self.placements[key[0]]
                rows.append((key[0], *_cells(p)))
                continue
            head, tail, _, _, _ = key
            for a, b in _runs(groups[key]):
                path = f"{head}{a}{tail}" if a == b else f"{head}{{{a}..{b}}}{tail}"
                rows.append((path, *_cells(self.placements[f"{head}{a}{tail}"])))
        return rows

    def __str__(self) -> str:
        rows = [("module", "stage", "ranks", "input", "output")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"plan of {self.model_type} at tp={self.tp} × pp={self.pp}, {str(self.dtype).removeprefix('torch.')}",
                 ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += ["", "parameters per rank:"]
        for stage, (start, end) in self.stage_layers.items():
            ranks = [stage * self.tp + t for t in range(self.tp)]
            sizes = {self.parameter_bytes[r] for r in ranks}
            # The tensor-parallel ranks of a stage usually hold equal slices: one line for them.
            each = len(sizes) == 1 and len(ranks) > 1
            for rank in [ranks[0]] if len(sizes) == 1 else ranks:
                who = f"ranks {ranks[0]}-{ranks[-1]}" if each else f"rank {rank}"
                b = self.parameter_bytes[rank]
                lines.append(f"  {who} (stage {stage}, layers {start}..{end - 1}): {b / GIB:.2f} GiB ({b} bytes)"
                             + (" each" if each else ""))
        total = sum(self.parameter_bytes.values())
        lines.append(f"  all ranks: {total / GIB:.2f} GiB")
        a = self.activations
        lines += ["", "activations per token per layer, on one rank:",
                  f"  hidden states: {a['hidden_states']} bytes",
                  f"  widest intermediate: {a['intermediate']['path']}.output, {a['intermediate']['bytes']} bytes"
                  if a["intermediate"]["path"] else "  widest intermediate: no linear module of another width"]
        return "\n".join(lines)


def _cells(p: Placement) -> tuple[str, str, str, str]:
    stage = "every" if p.owner_stage is None else str(p.owner_stage)
    ranks = list(p.ranks)
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    text = f"{ranks[0]}-{ranks[-1]}" if contiguous and len(ranks) > 1 else ",".join(map(str, ranks))
    return stage, text, p.input, p.output


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def _config(config_or_dir: Any) -> Any:
    import transformers

    if not isinstance(config_or_dir, (str, os.PathLike)):
        return config_or_dir
    if not os.path.exists(config_or_dir):  # not a hub name: planning downloads nothing
        raise FileNotFoundError(f"{config_or_dir}: no such checkpoint directory or config.json")
    return transformers.AutoConfig.from_pretrained(str(config_or_dir))  # a directory or its config.json


def plan(config_or_dir: Union[str, os.PathLike, Any], tp: int = 1, pp: int = 1,
         dtype: Union[str, torch.dtype, None] = None, root: str = "model") -> Plan:
    """The :class:`Plan` of the model of ``config_or_dir`` (a checkpoint directory, a
    ``config.json`` path or a transformers config) at ``tp × pp``, with parameters of
    ``dtype`` (default: the configuration's, else float32). Paths start with ``root``, as
    ``nd.LanguageModel``'s do.

    Raises :class:`UnshardableModel` (the engine's check) when the degrees do not split the
    model, :class:`TopologyError` when a degree is not a positive integer.
    """
    tp, pp = _degree("tp", tp) or 1, _degree("pp", pp) or 1
    config = _config(config_or_dir)
    engine.check(config, tp, pp)
    asked = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, asked, None) if isinstance(asked, str) else asked
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={asked!r} is not a torch dtype: use e.g. 'bfloat16', 'float16' or 'float32'")
    model = engine.meta_model(config, dtype)
    # Rank 0 of one replica: the table's ranks are the replica's (0 .. pp·tp-1).
    topo = Topology(pp * tp, 0, 0, 1, pp, tp, launcher="plan", device=torch.device("meta"))
    table = engine.placements(model, topo, root)
    layers = config.num_hidden_layers
    size = dtype.itemsize
    held: dict[int, dict[int, int]] = {r: {} for r in range(pp * tp)}  # rank -> {id(param): bytes}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, counts in engine.parameter_shards(model, topo).items():
        owner = table[f"{root}.{name.rpartition('.')[0]}"].owner_stage
        for stage in range(pp) if owner is None else [owner]:
            for t in range(tp):
                # A tied parameter is one tensor on a stage that holds it under two names.
                held[topo.rank_of(stage, t)][id(params[name])] = counts[t] * size
    return Plan(
        model_type=config.model_type, tp=tp, pp=pp, dtype=dtype, placements=table,
        parameter_bytes={r: sum(b.values()) for r, b in held.items()},
        stage_layers={s: engine.layer_range(s, pp, layers) for s in range(pp)},
        activations=_activations(model, table, config, root, tp, size),
    )


def _activations(model: torch.nn.Module, table: dict[str, Placement], config: Any, root: str, tp: int,
                 size: int) -> dict[str, Any]:
    """Bytes per token of the hidden states and of the widest intermediate of layer 0 on one
    rank: the linear outputs that are not of the hidden width (those are hidden states
    again), each ``out_features`` wide, or the widest rank's slice when it is a shard."""
    hidden = config.hidden_size * size
    widest = {"path": None, "bytes": 0}
    first = f"{root}.{model.base_model_prefix}.layers.0."
    for name, module in model.named_modules():
        path = f"{root}.{name}"
        if not path.startswith(first) or getattr(module, "out_features", config.hidden_size) == config.hidden_size:
            continue
        width = module.out_features
        if shard_dim(table[path].output) is not None:
            width = -(-width // tp)  # the widest slice: DTensor's first ranks hold the rounded-up share
        if width * size > widest["bytes"]:
            widest = {"path": path, "bytes": width * size}
    return {"hidden_states": hidden, "intermediate": widest}
