"""Logit lens: the top token of every layer at every position, read through the final norm and head.

    launch/torchrun.sh 2 examples/logit_lens.py --pp 2               # two pipeline stages
    launch/torchrun.sh 4 examples/logit_lens.py --tp 2 --pp 2
    python examples/logit_lens.py                                    # one process

For each decoder layer, the trace calls the model's own final norm and ``lm_head`` on the
layer's output: ``model.lm_head(model.model.norm(layer.output))``. With ``--pp 2`` the
early layers live on stage 0 and the norm and head on stage 1; the call is made where the
body asks for it and the owner stage computes it, so the body reads as in one process.
Every rank computes the same table; rank 0 writes ``logit_lens.csv`` (layer, position,
token, top_id, top_token, probability) and ``logit_lens.png`` (the top tokens, colored by their
probability) into ``--out``. Written for Llama-style models (``model.model.layers``,
``model.model.norm``); without a checkpoint in ``--model-dir`` a tiny random Llama is built.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

import nnsight_dist as nd
from experiment import CLEAN, load_model, parser, pyplot, save_figure, write_csv, wrote



@dataclass
class Lens:
    """``tokens[layer, position]``: the top token id, ``probs[layer, position]`` its probability."""

    tokens: torch.Tensor
    probs: torch.Tensor


def lens(model: Any, prompt: str) -> Lens:
    """The logit lens of ``prompt`` at every layer (collective: every rank gets the whole table)."""
    with torch.no_grad(), model.trace(prompt):
        tokens = nd.save([])
        probs = nd.save([])
        for layer in model.model.layers:
            top = model.lm_head(model.model.norm(layer.output)).softmax(-1)[0].max(-1)
            tokens.append(top.indices)
            probs.append(top.values)
    return Lens(torch.stack(tokens), torch.stack(probs))


def draw(plt: Any, result: Lens, inputs: Sequence[str], decode: Any, path: str) -> None:
    """The grid of top tokens (layers down, input positions across), colored by probability."""
    layers, positions = result.tokens.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * positions, 1.5 + 0.45 * layers))
    top = float(result.probs.max())  # the scale ends at the largest probability: small ones stay visible
    image = ax.imshow(result.probs.numpy(), cmap="Blues", vmin=0, vmax=top, aspect="auto")
    for layer in range(layers):
        for pos in range(positions):
            dark = result.probs[layer, pos] > 0.6 * top
            ax.text(pos, layer, repr(decode(result.tokens[layer, pos]))[1:-1], ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(positions), [repr(t)[1:-1] for t in inputs], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(layers))
    ax.set_xlabel("input token")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top token of lm_head(norm(layer output))", fontsize=10)
    fig.colorbar(image, ax=ax, label="probability")
    save_figure(plt, fig, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = parser(__doc__)
    p.add_argument("--prompt", default=CLEAN)
    args = p.parse_args(argv)
    model = load_model(args)
    result = lens(model, args.prompt)
    if model.topology.rank != 0:
        return
    decode = model.tokenizer.decode
    inputs = [decode(i) for i in model.tokenizer(args.prompt).input_ids]
    topo = model.topology
    print(f"topology: world {topo.world_size} = dp {topo.dp} x pp {topo.pp} x tp {topo.tp}")
    print(f"last layer, last position: {decode(result.tokens[-1, -1])!r} (p = {float(result.probs[-1, -1]):.4f})")
    os.makedirs(args.out, exist_ok=True)
    rows = [(layer, pos, inputs[pos], int(result.tokens[layer, pos]), decode(result.tokens[layer, pos]),
             float(result.probs[layer, pos]))
            for layer in range(result.tokens.shape[0]) for pos in range(result.tokens.shape[1])]
    header = ("layer", "position", "token", "top_id", "top_token", "probability")
    write_csv(os.path.join(args.out, "logit_lens.csv"), header, rows)
    plt = pyplot()
    if plt is not None:
        draw(plt, result, inputs, decode, os.path.join(args.out, "logit_lens.png"))
    wrote(args.out, "logit_lens", plt is not None)


if __name__ == "__main__":
    main(sys.argv[1:])
