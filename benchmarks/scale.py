"""Memory at scale: each rank of a tp × pp model holds its share of the weights, plus a constant.

What is measured
----------------
A random Llama of about 1B parameters (default: 16 layers, hidden 2048, 16 heads, 8
key/value heads, intermediate 5632, vocab 32000; float32, 3.3 GiB) is written once by
``nd.testing.make_tiny_model`` (deterministic random weights, its own small tokenizer), in
a forked child so that this process never holds the weights. Then ``tp × pp`` ranks are
forked (``nnsight_dist.testing.ranks.run_ranks``, gloo on CPU); each loads
``nd.LanguageModel(dir, tp=, pp=)`` and traces one prompt, reading from
``/proc/self/status``:

* ``base``: ``VmRSS`` (and ``RssAnon``) before the load: the forked interpreter with torch
  and transformers;
* ``load`` / ``trace``: ``VmHWM`` (peak resident) after the load, and after one trace that
  saves the last layer's output and the logits;
* ``anon`` / ``file``: ``RssAnon`` and ``RssFile`` after the trace: the process's own memory,
  and the pages of mapped files (the safetensors file is memory-mapped while loading; those
  pages are the page cache, shared by the ranks, yet ``VmHWM`` counts them);
* ``weights``: the bytes of the parameters this rank holds (the local shard of a
  tensor-parallel parameter, every other parameter of its stage whole);
* ``share``: the file's bytes / (tp · pp), the ideal even split.

The table gives each rank's numbers and ``peak − weights`` (the constant: interpreter,
libraries, loading buffers, activations, mapped pages beyond the rank's own tensors). Run::

    python benchmarks/scale.py                      # the 1B model, tp=2 × pp=2
    python benchmarks/scale.py --layers 4 --hidden 512 --intermediate 1408 --heads 8 --kv-heads 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "The Eiffel Tower is in the city of"
MiB = 2**20


def _status(field: str) -> int:
    """``field`` of /proc/self/status in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _local_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (a DTensor counts its local shard)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(getattr(t, "to_local", lambda t=t: t)().nbytes for t in tensors)


def _rank(rank: int, path: str, tp: int, pp: int) -> dict:
    base, base_anon = _status("VmRSS"), _status("RssAnon")
    start = time.perf_counter()
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    loaded, load_s = _status("VmHWM"), time.perf_counter() - start
    start = time.perf_counter()
    with model.trace(PROMPT):
        model.model.layers[-1].output.save()
        model.lm_head.output.save()
    return {"base": base, "load": loaded, "trace": _status("VmHWM"), "base_anon": base_anon, "anon": _status("RssAnon"),
            "file": _status("RssFile"), "weights": _local_bytes(model._module),
            "load_s": load_s, "trace_s": time.perf_counter() - start,
            "where": f"pp {model.topology.pp_rank} tp {model.topology.tp_rank}"}


def _build(args: argparse.Namespace) -> float:
    """Write the model in a forked child (its weights stay out of this process); seconds taken."""
    start = time.perf_counter()
    child = mp.get_context("fork").Process(target=nd.testing.make_tiny_model, args=(args.dir,), kwargs=dict(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, vocab=args.vocab))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"building the model failed (exit code {child.exitcode})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 16), ("hidden", 2048), ("heads", 16), ("kv-heads", 8),
                          ("intermediate", 5632), ("vocab", 32000), ("tp", 2), ("pp", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dir", default=None, help="where to write the model (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the ranks")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # an existing identical build in --dir is reused
        args.dir = args.dir or tmp
        build_s = _build(args)
        file_bytes = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
                         if f.endswith(".safetensors"))
        start = time.perf_counter()
        results = run_ranks(_rank, args.tp * args.pp, args.dir, args.tp, args.pp, timeout=args.timeout,
                            env={"NNSIGHT_DIST_TIMEOUT": str(args.timeout)})
        ranks_s = time.perf_counter() - start
    share = file_bytes / (args.tp * args.pp)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {file_bytes / 2**30:.2f} GiB of weights "
          f"({file_bytes // 4 / 1e9:.2f} B float32 parameters); tp={args.tp} × pp={args.pp}; "
          f"share = {share / MiB:.0f} MiB\n")
    print("| rank | where | base (anon) MiB | weights MiB | VmHWM load MiB | VmHWM trace MiB | anon MiB | file MiB "
          "| peak − weights MiB | load s | trace s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank, r in enumerate(results):
        cells = [rank, r["where"], f"{r['base'] / MiB:.0f} ({r['base_anon'] / MiB:.0f})",
                 *(f"{r[k] / MiB:.0f}" for k in ("weights", "load", "trace", "anon", "file")),
                 f"{(r['trace'] - r['weights']) / MiB:.0f}", f"{r['load_s']:.1f}", f"{r['trace_s']:.1f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    total = sum(r["trace"] for r in results)
    anon = sum(r["anon"] for r in results)
    print(f"\nsum of the ranks' peaks: {total / 2**30:.2f} GiB, of their own memory after the trace: "
          f"{anon / 2**30:.2f} GiB; build {build_s:.0f} s, ranks {ranks_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
