"""Attribution patching: the linear estimate of every activation-patching cell from one backward pass.

    launch/torchrun.sh 4 examples/attribution_patching.py --tp 2 --pp 2
    python examples/attribution_patching.py                          # one process

Activation patching (examples/activation_patching.py) runs the corrupted prompt once per
(layer, position) cell. Attribution patching estimates all cells at once: the change of
the metric when the clean activation replaces the corrupted one is, to first order,

    (gradient of the metric at the corrupted activation) · (clean - corrupted activation)

summed over the hidden dimension, so one forward and one backward pass of the corrupted
prompt (``with metric.backward(): g = h.grad.save()``, nnsight's form) and one clean
forward give the whole map. The values are normalized as activation patching's are (divided
by the clean minus the corrupted metric), and rank 0 draws the estimate beside the real
sweep (which this example also runs, split over the replicas): ``attribution_patching.png``
and ``attribution_patching.csv`` (layer, position, token, value, activation_patching) in
``--out``. Where the two disagree the metric is far from linear in that activation.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import torch

import nnsight_dist as nd
from activation_patching import clean_run, normalize, sweep
from experiment import (Prompts, add_prompts, grid_rows, heatmap, load_model, logit_diff, parser, prompts, pyplot,
                        save_figure, write_csv, wrote)


def attribution(model: Any, p: Prompts) -> torch.Tensor:
    """The normalized attribution-patching estimate ``[layers, positions]`` (collective: every
    rank gets it)."""
    with torch.no_grad():
        clean_hidden, clean, corrupt = clean_run(model, p)
    layers = model.model.layers
    with model.trace(p.corrupt):
        hidden = [layer.output for layer in layers]
        saved = nd.save([h.detach() for h in hidden])
        metric = logit_diff(model.lm_head.output, p.answers).sum()
        with metric.backward():
            grads = nd.save([h.grad for h in reversed(hidden)])  # gradients arrive last layer first
    model.zero_grad(set_to_none=True)  # the backward pass also filled the parameters' .grad
    effect = torch.stack([(g * (c - h)).sum(-1)[0]
                          for g, c, h in zip(reversed(grads), clean_hidden, saved)])
    return normalize(corrupt + effect, clean, corrupt)  # the estimated patched metric, normalized


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = parser(__doc__)
    add_prompts(p)
    p.add_argument("--batch", type=int, default=16, help="activation-patching cells per trace (one invoke each)")
    args = p.parse_args(argv)
    model = load_model(args)
    pair = prompts(model, args)
    estimate = attribution(model, pair)
    exact = sweep(model, pair, args.batch)
    if exact is None:
        return
    topo = model.topology
    print(f"topology: world {topo.world_size} = dp {topo.dp} x pp {topo.pp} x tp {topo.tp}")
    corr = torch.corrcoef(torch.stack([estimate.flatten(), exact.table.flatten()]))[0, 1]
    print(f"attribution vs activation patching: correlation {float(corr):.3f} over {estimate.numel()} cells")
    os.makedirs(args.out, exist_ok=True)
    rows = [row + (float(exact.table[row[0], row[1]]) + 0.0,) for row in grid_rows(estimate, pair.tokens)]
    write_csv(os.path.join(args.out, "attribution_patching.csv"),
              ("layer", "position", "token", "value", "activation_patching"), rows)
    plt = pyplot()
    if plt is not None:
        width = 1 + 0.5 * len(pair.tokens)
        fig, axes = plt.subplots(1, 2, figsize=(2 * width, 1.5 + 0.4 * estimate.shape[0]))
        bound = float(torch.cat([exact.table, estimate]).abs().max())  # one color scale for both panels
        heatmap(axes[0], exact.table, pair.tokens, "activation patching", "normalized logit difference", bound)
        heatmap(axes[1], estimate, pair.tokens, "attribution patching (gradient x difference)",
                "normalized logit difference (estimate)", bound)
        save_figure(plt, fig, os.path.join(args.out, "attribution_patching.png"))
    wrote(args.out, "attribution_patching", plt is not None)


if __name__ == "__main__":
    main(sys.argv[1:])
