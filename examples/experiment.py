"""What the patching examples share: their command line, the model, the two prompts, the
logit-difference metric, and the files rank 0 writes (CSV tables, heatmaps).

An *experiment* here runs on every rank of a launch (torchrun, mpirun, srun, or one plain
process): every rank loads its part of the model and runs the same traces, each
data-parallel replica may take its own share of the work, and rank 0 alone writes the
results. The figures need matplotlib (the ``plot`` extra); without it the examples say so
and still write their CSV tables.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

import nnsight_dist as nd

#: Two prompts of the same token length that differ in one word, and the answer each one
#: favours. Chosen so that both tokenize to the same length with the tiny models' tokenizer
#: as well as with GPT-2's or Llama's.
CLEAN = "The cat sat on the"
CORRUPT = "The dog sat on the"
ANSWERS = (" mat", " bed")


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line every example takes; ``doc`` is the example's module docstring."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "nnsight_dist_examples"),
                   help="a checkpoint directory; a tiny Llama is built there when it holds none")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    p.add_argument("--out", default="out", help="directory rank 0 writes the CSV and PNG files into")
    return p


def add_prompts(p: argparse.ArgumentParser) -> None:
    """The clean/corrupted prompt pair and the two answers of the patching experiments."""
    p.add_argument("--clean", default=CLEAN, help="the prompt whose activations are patched in")
    p.add_argument("--corrupt", default=CORRUPT, help="the prompt they are patched into (same token length)")
    p.add_argument("--answers", nargs=2, default=list(ANSWERS), metavar=("CLEAN_ANSWER", "CORRUPT_ANSWER"),
                   help="the logit difference is taken between the first tokens of these two")


def load_model(args: argparse.Namespace) -> nd.LanguageModel:
    """The model of ``--model-dir`` loaded with ``--tp``/``--pp`` (collective: every rank calls it).

    When the directory holds no ``config.json``, rank 0 builds a tiny Llama there first
    (deterministic weights, a locally trained tokenizer); the others wait for it.
    """
    torch.set_num_threads(1)
    topo = nd.init(tp=args.tp, pp=args.pp)
    if topo.rank == 0 and not os.path.exists(os.path.join(args.model_dir, "config.json")):
        nd.testing.make_tiny_model(args.model_dir)
    nd.broadcast_object(args.model_dir)  # the others wait until rank 0 has written it
    return nd.LanguageModel(args.model_dir, tp=args.tp, pp=args.pp)


@dataclass
class Prompts:
    """The tokenized prompt pair: ``tokens`` are the clean prompt's, one string a position;
    ``answers`` the two answer token ids (clean's first)."""

    clean: str
    corrupt: str
    tokens: list[str]
    answers: tuple[int, int]


def prompts(model: Any, args: argparse.Namespace) -> Prompts:
    """Check the pair (same token length, answers told apart by their first tokens) and tokenize it."""
    tok = model.tokenizer
    clean, corrupt = tok(args.clean).input_ids, tok(args.corrupt).input_ids
    if len(clean) != len(corrupt):
        raise SystemExit(f"the prompts must have the same number of tokens: {args.clean!r} has {len(clean)}, "
                         f"{args.corrupt!r} has {len(corrupt)}")
    answers = tuple(tok(a, add_special_tokens=False).input_ids[0] for a in args.answers)
    if answers[0] == answers[1]:
        raise SystemExit(f"the answers {args.answers} start with the same token {tok.decode(answers[0])!r}: "
                         "give two whose first tokens differ")
    return Prompts(args.clean, args.corrupt, [tok.decode(i) for i in clean], answers)


def logit_diff(logits: torch.Tensor, answers: tuple[int, int]) -> torch.Tensor:
    """The metric: clean answer's logit minus the corrupted answer's, at the last position
    (``logits`` is ``[batch, positions, vocab]``; one value per batch row)."""
    return logits[:, -1, answers[0]] - logits[:, -1, answers[1]]


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a table (floats with full float32 precision)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([f"{v:.9g}" if isinstance(v, float) else v for v in row])


def grid_rows(table: torch.Tensor, tokens: Sequence[str]) -> list[tuple[int, int, str, float]]:
    """``(layer, position, token, value)`` rows of a ``[layers, positions]`` table."""
    return [(layer, pos, tokens[pos], float(table[layer, pos]) + 0.0)  # + 0.0: no "-0" in the table
            for layer in range(table.shape[0]) for pos in range(table.shape[1])]


def pyplot() -> Optional[Any]:
    """matplotlib's pyplot on the file-only ``Agg`` backend, or ``None`` (with a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'nnsight_dist[plot]'): no figures, only the CSV tables")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(ax: Any, table: torch.Tensor, tokens: Sequence[str], title: str, label: str,
            bound: Optional[float] = None) -> None:
    """Draw a ``[layers, positions]`` table on ``ax``: layers down, positions across (labelled by
    their tokens), a diverging color scale from ``-bound`` to ``bound`` (default: the table's
    largest magnitude)."""
    bound = bound or float(table.abs().max()) or 1.0
    image = ax.imshow(table.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]))
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=label)


def save_figure(plt: Any, fig: Any, path: str) -> None:
    """Lay ``fig`` out, write it to ``path`` (PNG) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wrote(out: str, name: str, plotted: bool) -> None:
    """Say what an example wrote."""
    print(f"wrote {out}/{name}.csv" + (" and .png" if plotted else ""))
