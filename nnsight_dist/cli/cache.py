"""``python -m nnsight_dist cache``: collect a model's activations into a store, on every rank.

Run it under a launcher, one process per rank::

    launch/torchrun.sh 4 -m nnsight_dist cache --model DIR --data docs.jsonl \\
        --modules 'model.layers.*.mlp' --out store/ --tp 2 --pp 2 --batch-size 8

(or ``mpirun -n 4 python -m nnsight_dist cache ...``, or ``srun``). Rank 0 shows the
progress bar and, at the end, what the store holds.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from ..store.format import StoreError, dtype_of


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnsight_dist cache",
                                description="Collect activations of a (sharded) model into an activation store.")
    p.add_argument("--model", required=True, help="checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one document per line) or .jsonl (a 'text' field) file")
    p.add_argument("--modules", required=True, nargs="+", metavar="PATTERN",
                   help="module paths or glob patterns relative to the model, e.g. 'model.layers.*.mlp'")
    p.add_argument("--out", required=True, help="the store's directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="cut documents to this many tokens")
    p.add_argument("--dtype", default=None, help="store values in this dtype (e.g. bfloat16)")
    p.add_argument("--model-dtype", default=None, help="load the weights in this dtype")
    p.add_argument("--include-inputs", action="store_true", help="also store each module's first input")
    p.add_argument("--gather-tp", action="store_true", help="store tensor-parallel shards whole")
    p.add_argument("--chunk-batches", type=int, default=16, help="batches per chunk file")
    p.add_argument("--no-resume", action="store_true", help="replace an earlier store in --out instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    try:
        return dtype_of(name)
    except StoreError:
        raise SystemExit(f"unknown dtype {name!r} (e.g. float32, bfloat16, float16)") from None


def main_cache(argv: list[str]) -> int:
    """Parse ``argv`` and collect; 0 on success."""
    args = parser().parse_args(argv)
    import nnsight_dist as nd

    model = nd.LanguageModel(args.model, tp=args.tp, pp=args.pp, dtype=_dtype(args.model_dtype))
    store = nd.collect_activations(
        model, args.data, args.modules, args.out, batch_size=args.batch_size, max_length=args.max_length,
        dtype=_dtype(args.dtype), include_inputs=args.include_inputs, gather_tp=args.gather_tp,
        resume=not args.no_resume, progress=not args.quiet, chunk_batches=args.chunk_batches,
    )
    if model.topology.rank == 0:
        print(store.describe())
    return 0
