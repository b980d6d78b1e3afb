"""The activation store's four figures (issue 8), each against its baseline in the same run.

``write``    The store's chunk writer (float32 statistics, a safetensors file under a
             temporary name, sha256 read back while the fsync waits on the disk, rename,
             sidecar) against ``safetensors.torch.save_file`` of the same tensors, and
             against ``save_file`` followed by an fsync (the same durability). A stream of
             ``--chunks`` chunks of ``--chunk-mb`` MB each, the three variants interleaved
             (rotating order) over ``--reps`` repetitions; throughput = bytes / median time.
``collect``  ``nd.collect_activations`` over ``--docs`` documents against an untraced forward
             of the same batches (the same tokenization and padding, under ``no_grad``),
             and against nnsight 0.8.1 as a user writes it (a trace per batch saving the
             modules, padding dropped by hand, one ``save_file`` per batch), interleaved.
``memory``   Peak resident memory of a collection in a fresh process as the data grows
             1×, 2×, 4× (Linux: the peak is reset through ``/proc/self/clear_refs`` once the
             model is loaded, and read as ``VmHWM`` when the collection returns).
``pipeline`` At pp=2 on two forked ranks: collection time over the same documents with the
             stages working on different batches at once against one batch at a time.

    python benchmarks/store.py                    # all four, defaults
    python benchmarks/store.py --what write --chunk-mb 64 --chunks 8
Prints one table per figure (``--markdown`` for docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

torch.set_num_threads(1)
WHAT = ("write", "collect", "memory", "pipeline")
WORDS = ("the river tower city paris light stone bridge north water market garden old new road "
         "king music field winter summer").split()


def documents(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` deterministic documents of ``words`` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per repetition of each variant, run in rotating order."""
    times = common.measure_rotating(lambda v, _: variants[v](), ["x"], list(variants), reps, warmup, "reps", True)
    return times["x"]


# ---------------------------------------------------------------------------- write


def bench_write(args: argparse.Namespace) -> str:
    from safetensors.torch import save_file

    from nnsight_dist.store.writer import ChunkWriter

    rows = args.chunk_mb * (1 << 20) // (4 * 1024)
    chunks = [torch.randn(rows, 1024, generator=torch.Generator().manual_seed(i)) for i in range(args.chunks)]
    root = tempfile.mkdtemp(dir=args.tmp)

    def store() -> None:
        writer = ChunkWriter(os.path.join(root, "store"))
        for i, x in enumerate(chunks):
            writer.put({f"e/c{i}.safetensors": x})
            writer.end_chunk()
        writer.close()

    def plain(fsync: bool) -> Callable[[], None]:
        def run() -> None:
            os.makedirs(os.path.join(root, "plain"), exist_ok=True)
            for i, x in enumerate(chunks):
                path = os.path.join(root, "plain", f"c{i}.safetensors")
                save_file({"rows": x}, path)
                if fsync:
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
        return run

    times = interleaved({"store": store, "save_file": plain(False), "save_file+fsync": plain(True)}, args.reps)
    shutil.rmtree(root)
    total = sum(x.numel() * 4 for x in chunks) / 1e6
    med = {k: common.median_ms(v) / 1e3 for k, v in times.items()}
    body = [[k, f"{total / med[k]:,.0f}", f"{med[k] * 1e3:,.0f}", f"{med['store'] and med[k] / med['store']:.2f}"]
            for k in times]
    return (f"write: {args.chunks} chunks × {args.chunk_mb} MB (float32 rows of 1024), median of {args.reps}\n"
            + common.render(["variant", "MB/s", "ms", "store throughput ÷ this"], body, args.markdown))


# ---------------------------------------------------------------------------- collect


def tiny_model(args: argparse.Namespace) -> str:
    import nnsight_dist as nd

    return nd.testing.make_tiny_model(os.path.join(args.tmp, "bench-store-model"), arch="llama", layers=args.layers,
                                      hidden=args.hidden, heads=8, kv_heads=8, intermediate=args.hidden * 4)


def bench_collect(args: argparse.Namespace) -> str:
    import nnsight_dist as nd

    path = tiny_model(args)
    model = nd.LanguageModel(path)
    docs = documents(args.docs, args.words)
    batches = [docs[i:i + args.batch_size] for i in range(0, len(docs), args.batch_size)]
    modules = args.modules
    out = tempfile.mkdtemp(dir=args.tmp)

    def untraced() -> None:
        with torch.no_grad():
            for batch in batches:
                rows = [list(r) for r in model.tokenizer(batch)["input_ids"]]
                _, kw, _, _ = model._batch([((rows,), {})])
                model._module(**kw, position_ids=(kw["attention_mask"].cumsum(-1) - 1).clamp(min=0))

    def collect() -> None:
        nd.collect_activations(model, docs, modules, os.path.join(out, "nd"), batch_size=args.batch_size,
                               resume=False, progress=False)

    variants = {"untraced": untraced, "collect_activations": collect}
    nn = _nnsight(path, batches, modules, out) if args.nnsight else None
    if nn is not None:
        variants["nnsight 0.8.1 + save_file"] = nn
    times = interleaved(variants, args.reps)
    store = nd.ActivationStore(os.path.join(out, "nd"))
    shutil.rmtree(out)
    med = {k: common.median_ms(v) for k, v in times.items()}
    mb = sum(store[m].shape[0] * torch.Size(store[m].shape[1:]).numel() * 4 for m in store.modules) / 1e6
    body = [[k, f"{med[k]:,.0f}", f"{med[k] / med['untraced']:.3f}",
             f"{common.pm(*common.paired(times[k], times['untraced']))}"] for k in times]
    return (f"collect: {len(docs)} documents ({store.num_tokens} tokens), batch {args.batch_size}, "
            f"llama {args.layers} layers × hidden {args.hidden}, modules {' '.join(modules)}, {mb:,.0f} MB "
            f"written, median of {args.reps}\n"
            + common.render(["variant", "ms", "÷ untraced", "paired Δ ms"], body, args.markdown))


def _nnsight(path: str, batches: list[list[str]], modules: list[str], out: str) -> Any:
    """The same collection as an nnsight 0.8.1 user writes it, or ``None`` without nnsight."""
    try:
        import nnsight
    except ImportError:
        return None
    from safetensors.torch import save_file

    model = nnsight.LanguageModel(path, dispatch=True)
    import nnsight_dist as nd

    names = [p for p, _ in nd.LanguageModel(path).named_modules()]
    chosen = [n.removeprefix("model.") for n in names if any(_match(n.removeprefix("model."), m) for m in modules)]
    os.makedirs(os.path.join(out, "nn"), exist_ok=True)

    def run() -> None:
        for b, batch in enumerate(batches):
            with torch.no_grad(), model.trace(batch):
                saved = nnsight.save([model.get(n).output for n in chosen])
            enc = model.tokenizer(batch, padding=True, return_tensors="pt")
            keep = enc["attention_mask"].bool()
            save_file({n: (s[0] if isinstance(s, tuple) else s)[keep].contiguous() for n, s in zip(chosen, saved)},
                      os.path.join(out, "nn", f"b{b}.safetensors"))
    return run


def _match(path: str, pattern: str) -> bool:
    from nnsight_dist.store.plan import _matches

    return bool(_matches(pattern, [path]))


# ---------------------------------------------------------------------------- memory


def bench_memory(args: argparse.Namespace) -> str:
    body = []
    for scale in (1, 2, 4):
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", str(scale), "--docs", str(args.docs),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch-size", str(args.batch_size),
               "--words", str(args.words), "--tmp", args.tmp, "--modules", *args.modules]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        tokens, mb, before, peak = out.stdout.split()[-4:]
        body.append([f"{scale}×", tokens, f"{float(mb):,.0f}", f"{int(before) / 1024:,.0f}", f"{int(peak) / 1024:,.0f}",
                     f"{(int(peak) - int(before)) / 1024:,.0f}"])
    base = float(body[0][4].replace(",", ""))
    for row in body:
        row.append(f"{float(row[4].replace(',', '')) / base:.3f}")
    return ("memory: resident memory of a collection in a fresh process (model loaded before; peak reset "
            "just before the collection)\n"
            + common.render(["data", "tokens", "MB written", "RSS before MiB", "peak RSS MiB", "peak - before",
                             "peak ÷ 1×"], body, args.markdown))


def child_memory(args: argparse.Namespace) -> None:
    import nnsight_dist as nd

    model = nd.LanguageModel(tiny_model(args))
    docs = documents(args.docs * args.child_memory, args.words, seed=1)
    out = tempfile.mkdtemp(dir=args.tmp)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _status("VmRSS")
    store = nd.collect_activations(model, docs, args.modules, out, batch_size=args.batch_size, progress=False)
    peak = _status("VmHWM")
    mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / 1e6
    shutil.rmtree(out)
    print(store.num_tokens, mb, before, peak)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ---------------------------------------------------------------------------- pipeline


def _pipeline_rank(rank: int, path: str, docs: list[str], modules: list[str], out: str, batch: int,
                   reps: int) -> dict:
    import nnsight_dist as nd

    model = nd.LanguageModel(path, pp=2)
    times: dict[str, list[float]] = {"one batch at a time": [], "pipelined": []}
    for rep in range(reps + 1):
        order = list(times) if rep % 2 == 0 else list(times)[::-1]
        for variant in order:
            start = time.perf_counter()
            nd.collect_activations(model, docs, modules, os.path.join(out, variant.replace(" ", "_")),
                                   batch_size=batch, resume=False, progress=False,
                                   pipelined=variant == "pipelined")
            if rep:
                times[variant].append(time.perf_counter() - start)
    return times


def bench_pipeline(args: argparse.Namespace) -> str:
    from nnsight_dist.testing.ranks import run_ranks

    path = tiny_model(args)
    out = tempfile.mkdtemp(dir=args.tmp)
    docs = documents(args.docs, args.words)
    results = run_ranks(_pipeline_rank, 2, path, docs, args.modules, out, args.batch_size, args.reps, timeout=3600)
    shutil.rmtree(out)
    times = {k: [max(r[k][i] for r in results) for i in range(args.reps)] for k in results[0]}
    med = {k: common.median_ms(v) for k, v in times.items()}
    base = med["one batch at a time"]
    body = [[k, f"{med[k]:,.0f}", f"{base / med[k]:.2f}"] for k in times]
    return (f"pipeline: pp=2 on 2 forked ranks, {len(docs)} documents, batch {args.batch_size}, median of {args.reps}\n"
            + common.render(["collection", "ms", "throughput ÷ one batch at a time"], body, args.markdown))


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", type=common.choices(WHAT, "figure"), default=list(WHAT))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-mb", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--words", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--modules", nargs="+", default=["model.layers.3", "model.layers.7"])
    p.add_argument("--no-nnsight", dest="nnsight", action="store_false")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        child_memory(args)
        return 0
    for what in args.what:
        print(globals()[f"bench_{what}"](args), flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
