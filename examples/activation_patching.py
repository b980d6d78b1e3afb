"""Activation patching: which (layer, position) of the residual stream carries the answer.

    launch/torchrun.sh 4 examples/activation_patching.py --tp 2 --pp 1   # dp 2 × tp 2
    launch/torchrun.sh 4 examples/activation_patching.py --tp 2 --pp 2
    python examples/activation_patching.py                              # one process

Two prompts of the same token length differ in one word (clean: "The cat sat on the",
corrupted: "The dog sat on the"). For every cell (layer, position), the corrupted prompt
runs with the clean run's residual stream (the decoder layer's output) patched in at that
layer and position, and the metric is the logit difference of the two answers at the last
position, normalized as usual: 0 is the corrupted run's value, 1 the clean run's.

The cells are split over the data-parallel replicas (``nd.split_for_replica``); each
replica patches its cells, several per trace (one invoke per cell, batched into one
forward), and ``nd.gather_object`` brings the values to rank 0, which writes
``activation_patching.csv`` (layer, position, token, value) and ``activation_patching.png``
into ``--out``. Without ``--model-dir`` holding a checkpoint, a tiny Llama is built there
(random weights: the map shows the mechanics, not a circuit).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

import nnsight_dist as nd
from experiment import (Prompts, add_prompts, grid_rows, heatmap, load_model, logit_diff, parser, prompts, pyplot,
                        save_figure, write_csv, wrote)


@dataclass
class Sweep:
    """A patching map: ``table[layer, position]`` normalized, with the two unpatched metrics."""

    table: torch.Tensor
    clean: float
    corrupt: float


def normalize(values: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    """``(value - corrupt) / (clean - corrupt)``: 0 is the corrupted run, 1 the clean run."""
    return (values - corrupt) / (clean - corrupt)


def clean_run(model: Any, p: Prompts) -> tuple[list[torch.Tensor], float, float]:
    """The clean run's layer outputs and the clean and corrupted runs' metrics."""
    with model.trace(p.clean):
        hidden = nd.save([layer.output for layer in model.model.layers])
        clean = logit_diff(model.lm_head.output, p.answers).save()
    with model.trace(p.corrupt):
        corrupt = logit_diff(model.lm_head.output, p.answers).save()
    return hidden, float(clean), float(corrupt)


def patch(model: Any, p: Prompts, hidden: Sequence[torch.Tensor], cells: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The corrupted run's metric with the clean ``hidden[layer][:, position]`` patched in, for
    each cell: one trace, one invoke per cell."""
    layers = model.model.layers
    with model.trace() as tracer:
        values = nd.save([])
        for layer, pos in cells:
            with tracer.invoke(p.corrupt):
                layers[layer].output[:, pos] = hidden[layer][:, pos]
                values.append(logit_diff(model.lm_head.output, p.answers))
    return torch.cat(values)


def sweep(model: Any, p: Prompts, batch: int = 16) -> Optional[Sweep]:
    """The whole patching map on rank 0 (``None`` on the other ranks); collective.

    Each replica patches its share of the cells, ``batch`` cells per trace.
    """
    with torch.no_grad():  # no autograd graph is needed: keep none
        hidden, clean, corrupt = clean_run(model, p)
        cells = [(layer, pos) for layer in range(len(hidden)) for pos in range(len(p.tokens))]
        mine = nd.split_for_replica(cells)
        values = [patch(model, p, hidden, mine[i:i + batch]) for i in range(0, len(mine), batch)]
    mine_values = torch.cat(values) if values else torch.zeros(0)  # a replica may get no cells
    gathered = nd.gather_object({"cells": [list(c) for c in mine], "values": mine_values})
    if gathered is None:
        return None
    table = torch.full((len(hidden), len(p.tokens)), float("nan"))
    for part in gathered:  # every rank of a replica sends the same share
        for (layer, pos), value in zip(part["cells"], part["values"].tolist()):
            table[layer, pos] = value
    assert not table.isnan().any(), "a cell was patched by no replica"
    return Sweep(normalize(table, clean, corrupt), clean, corrupt)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = parser(__doc__)
    add_prompts(p)
    p.add_argument("--batch", type=int, default=16, help="cells patched per trace (one invoke each)")
    args = p.parse_args(argv)
    model = load_model(args)
    pair = prompts(model, args)
    result = sweep(model, pair, args.batch)
    if result is None:
        return
    topo = model.topology
    os.makedirs(args.out, exist_ok=True)
    print(f"topology: world {topo.world_size} = dp {topo.dp} x pp {topo.pp} x tp {topo.tp}")
    print(f"logit difference {args.answers[0]!r} - {args.answers[1]!r}: clean {result.clean:.4f}, "
          f"corrupted {result.corrupt:.4f}")
    write_csv(os.path.join(args.out, "activation_patching.csv"), ("layer", "position", "token", "value"),
              grid_rows(result.table, pair.tokens))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(pair.tokens), 1.5 + 0.4 * result.table.shape[0]))
        heatmap(ax, result.table, pair.tokens, "activation patching (residual stream)", "normalized logit difference")
        save_figure(plt, fig, os.path.join(args.out, "activation_patching.png"))
    wrote(args.out, "activation_patching", plt is not None)


if __name__ == "__main__":
    main(sys.argv[1:])
