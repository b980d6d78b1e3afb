"""The data path between pipeline stages at pp=2: the router against raw torch.distributed.

What is measured (rank 0's clock, interleaved in one run: each repetition runs every
variant once, in rotating order)
---------------------------------------------------------------------------------------
* ``routed``: a ping-pong of one value of a hidden state's size (``(1, 19, 128)`` float32,
  9.5 KiB) through the router (``Router.send`` / ``Router.wait``, as the engine's and the
  interventions' transfers use them), ``--rounds`` round trips per run, per round trip;
* ``raw``: the same ping-pong of the same tensor with ``dist.isend`` / ``dist.irecv`` and
  ``wait()`` on a gloo group of its own (the cheapest way to move those bytes);
* ``empty``: an empty trace of the tiny Llama at pp=2 (``with model.trace(batch): pass``);
* ``p2p``: the same untraced model made into a pipeline by hand with blocking sends and
  receives in forward hooks (``benchmarks/distributed.py``'s ``p2p``).

The ratios ``routed/raw`` and ``empty/p2p`` are printed with the targets of issue 10
(at most 2 and 1.15). Before timing, the empty trace's logits (read in a check trace) and
the p2p pipeline's are compared with a single-process run of the checkpoint.

Running
-------
::

    launch/torchrun.sh 2 benchmarks/datapath.py             # about 40 s
    launch/torchrun.sh 2 benchmarks/datapath.py --reps 200 --rounds 20

Options: ``--reps N`` (default 150), ``--rounds N`` (round trips per ping-pong run,
default 10), ``--warmup N`` (default 5), ``--model-dir DIR``, ``--no-progress``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

import torch

import nnsight_dist as nd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find common.py
import common  # noqa: E402
import distributed  # noqa: E402

TARGETS = {("routed", "raw"): 2.0, ("empty", "p2p"): 1.15}


def ping_pongs(s: Any, rounds: int) -> dict[str, Callable[[], None]]:
    """The two ping-pong variants: ``rounds`` round trips of a hidden state's bytes."""
    import torch.distributed as dist

    topo = s.topo
    router = s.nd_model.interleaver.seam.router  # driven directly, between traces
    value = torch.randn(1, s.batch["input_ids"].shape[1], s.nd_model.config.hidden_size)
    peer = topo.rank_of(1 - topo.pp_rank, topo.tp_rank)
    first = topo.pp_rank == 0
    group = s.p2p_group

    def routed() -> None:
        router.next_trace()
        for i in range(rounds):
            if first:
                router.send(peer, ("ping", i), value)
                router.wait(("pong", i), "a pong", peer)
            else:
                router.wait(("ping", i), "a ping", peer)
                router.send(peer, ("pong", i), value)
        router.complete_sends()

    def raw() -> None:
        got = torch.empty_like(value)
        sends = []
        for _ in range(rounds):
            if first:
                sends.append(dist.isend(value, dst=peer, group=group))
                dist.irecv(got, src=peer, group=group).wait()
            else:
                dist.irecv(got, src=peer, group=group).wait()
                sends.append(dist.isend(value, dst=peer, group=group))
        for work in sends:
            work.wait()

    return {"routed": routed, "raw": raw}


def check(s: Any) -> None:
    """The empty trace's and the p2p pipeline's logits against the single-process reference."""
    with torch.no_grad():
        want = s.ref_model(**s.batch).logits
    model = s.nd_model
    with model.trace(s.batch):
        got = nd.save(model.lm_head.output)
    hand = distributed.p2p_run(s, "empty")
    for name, logits in (("empty trace", got), ("p2p", hand)):
        if logits.shape != want.shape or not torch.allclose(logits, want, atol=1e-5):
            raise SystemExit(f"{name}: logits differ from the single-process reference")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--reps", type=int, default=150, help="timed repetitions (default 150)")
    parser.add_argument("--rounds", type=int, default=10, help="round trips per ping-pong run (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (default 5)")
    parser.add_argument("--model-dir", default=None, help="build the model in DIR/llama and reuse it")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    topo = nd.init(pp=2)
    if topo.world_size != 2:
        raise SystemExit(f"run this on exactly 2 ranks (got {topo.world_size})")
    tmp = None
    root = args.model_dir
    if root is None:
        tmp = root = nd.broadcast_object(tempfile.mkdtemp(prefix="nd_datapath_") if topo.rank == 0 else None)
    try:
        s = distributed.setup(argparse.Namespace(tp=1, pp=2, no_nnsight=True, no_nnsight_shim=False), topo, root)
        check(s)
        runs = ping_pongs(s, args.rounds)
        runs["empty"] = lambda: distributed.empty_trace_run(s, "empty")
        runs["p2p"] = lambda: distributed.p2p_run(s, "empty")
        variants = list(runs)
        times = common.measure_rotating(lambda v, name: runs[v](), ["datapath"], variants, args.reps,
                                        args.warmup, "datapath", topo.rank == 0 and not args.no_progress)
        if topo.rank == 0:
            per = times["datapath"]
            med = {v: common.median_ms(per[v]) / (args.rounds if v in ("routed", "raw") else 1) for v in variants}
            print(f"\npp=2, 2 ranks, {args.reps} repetitions (rotating order), rank 0's clock, medians; "
                  f"torch {torch.__version__}, {os.cpu_count()} CPUs")
            rows = [[v, f"{med[v]:.3f}"] for v in variants]
            print(common.render(["variant", "ms"], rows, False))
            for (a, b), target in TARGETS.items():
                ratio = med[a] / med[b]
                print(f"{a}/{b}: {ratio:.2f} (target <= {target}) {'met' if ratio <= target else 'missed'}")
            print("routed, raw: per round trip of a (1, 19, 128) float32 value; empty, p2p: per forward")
    finally:
        if tmp is not None:
            nd.broadcast_object(0)
            if topo.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
