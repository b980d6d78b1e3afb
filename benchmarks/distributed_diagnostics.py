"""Diagnostics of ``benchmarks/distributed.py``, run after the timing when asked:
``--micro`` (``micro``: the pieces of a trace's cost, measured in place) and
``--profile N`` (``profile``: cProfile of nnsight_dist traces on rank 0).
``s`` is always ``distributed.Setup``; ``trace(s, scenario)`` runs one nnsight_dist trace.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any, Callable

import torch


from common import median_ms as med


def micro(s: Any, trace: Callable[[Any, str], Any], n: int = 100) -> str:
    """Costs of the pieces, measured in place (``--micro``; instruments internals, timing only):

    - the two end-of-trace steps of an empty trace (``ReplicaSeam.drain``: every rank sends
      its end of trace on its streams and waits for its peers'; ``ReplicaSeam.close``: the
      digest barrier), against a bare blocking all-gather of ``int64[3]``;
    - tp: the end-of-run gather of a ``cache`` trace's fragments
      (``ReplicaSeam._assemble_fragments``, one collective per dtype) against a bare
      blocking all-gather of one fragment;
    - pp: 56 values of one hidden state's size (what ``cache`` sends) from the last stage
      to stage 0 through the router, against plain blocking send/recv of the same
      tensors and against one send of all of them in one buffer.
    """
    import torch.distributed as dist
    from nnsight_dist.distributed import replica

    topo = s.topo
    lines = []
    spent: dict[str, list[float]] = {"drain": [], "close": [], "gather": []}

    def timed(key: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key].append(time.perf_counter() - t0)
        return run

    cls = replica.ReplicaSeam
    saved = cls.drain, cls.close, cls._assemble_fragments
    cls.drain, cls.close = timed("drain", cls.drain), timed("close", cls.close)
    try:
        for _ in range(n):
            trace(s, "empty")
    finally:
        cls.drain, cls.close = saved[0], saved[1]
    group = topo.group("replica")
    small = torch.zeros(3, dtype=torch.long)
    parts = [torch.zeros(3, dtype=torch.long) for _ in topo.replica_ranks()]
    bare = []
    for _ in range(2 * n):
        t0 = time.perf_counter()
        dist.all_gather(parts, small, group=group)
        bare.append(time.perf_counter() - t0)
    lines.append(f"end of an empty trace: drain {med(spent['drain']):.3f} ms + close {med(spent['close']):.3f} ms; "
                 f"a bare blocking all_gather of int64[3] on the replica: {med(bare):.3f} ms")
    hidden = s.nd_model.config.hidden_size
    if topo.tp > 1:
        cls._assemble_fragments = timed("gather", saved[2])
        try:
            for _ in range(max(n // 4, 5)):
                trace(s, "cache")
        finally:
            cls._assemble_fragments = saved[2]
        piece = torch.randn(1, s.batch["input_ids"].shape[1], hidden // topo.tp)
        parts = [torch.empty_like(piece) for _ in range(topo.tp)]
        bare = []
        for _ in range(2 * n):
            t0 = time.perf_counter()
            dist.all_gather(parts, piece, group=topo.group("tp"))
            bare.append(time.perf_counter() - t0)
        lines.append(f"tp gather of a cache trace's fragments: {med(spent['gather']):.3f} ms each (median of "
                     f"{len(spent['gather'])}); a bare blocking all_gather of {tuple(piece.shape)}: {med(bare):.3f} ms")
    if topo.pp > 1:
        router = s.nd_model.interleaver.seam.router  # internal: driven directly, between traces
        count, value = 56, torch.randn(1, s.batch["input_ids"].shape[1], hidden)
        src, dst = topo.rank_of(topo.pp - 1, topo.tp_rank), topo.rank_of(0, topo.tp_rank)
        me = topo.rank

        def routed() -> None:
            router.next_trace()
            if me == src:
                for i in range(count):
                    router.send(dst, ("micro", i), value)
                router.complete_sends()
            elif me == dst:
                for i in range(count):
                    router.wait(("micro", i), "a value", src)
            dist.barrier(group=s.p2p_group)

        def plain() -> None:
            if me == src:
                for _ in range(count):
                    dist.send(value, dst=dst, group=s.p2p_group)
            elif me == dst:
                got = torch.empty_like(value)
                for _ in range(count):
                    dist.recv(got, src=src, group=s.p2p_group)
            dist.barrier(group=s.p2p_group)

        def one() -> None:
            if me == src:
                dist.send(value.repeat(count, 1, 1), dst=dst, group=s.p2p_group)
            elif me == dst:
                dist.recv(torch.empty(count, *value.shape[1:]), src=src, group=s.p2p_group)
            dist.barrier(group=s.p2p_group)

        res = {}
        for name, fn in (("router", routed), ("plain", plain), ("one", one)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(max(n // 4, 5)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[name] = med(ts)
        kib = value.numel() * value.element_size() / 1024
        lines.append(f"{count} values of {kib:.1f} KiB, stage {topo.pp - 1} -> stage 0: router {res['router']:.2f} ms "
                     f"({res['router'] / count:.3f} ms per message); plain blocking send/recv {res['plain']:.2f} ms "
                     f"({res['plain'] / count:.3f} ms per message); all in one buffer {res['one']:.2f} ms")
    return "\n".join(lines)



def profile(s: Any, trace: Callable[[Any, str], Any], scenarios: list[str], n: int) -> str:
    """cProfile ``n`` nnsight_dist traces per scenario on rank 0 (every rank runs them)."""
    out = io.StringIO()
    for name in scenarios:
        prof = cProfile.Profile() if s.topo.rank == 0 else None
        for _ in range(2):
            trace(s, name)
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        for _ in range(n):
            trace(s, name)
        wall = (time.perf_counter() - t0) / n * 1e3
        if prof is None:
            continue
        prof.disable()
        st = pstats.Stats(prof)
        own = sum(v[2] for k, v in st.stats.items() if "nnsight_dist" in k[0]) / n * 1e3
        out.write(f"\n## profile: {name} ({n} traces, {wall:.2f} ms per trace under the profiler; "
                  f"own time in nnsight_dist {own:.2f} ms per trace)\n")
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
            short = file.split("site-packages/")[-1].split("/work/main/")[-1]
            rows.append((ct / n * 1e3, tt / n * 1e3, nc / n, f"{short}:{line} {fn}"))
        out.write("cum ms   own ms   calls  function (by cumulative time)\n")
        for ct, tt, nc, where in sorted(rows, reverse=True)[:28]:
            out.write(f"{ct:7.3f}  {tt:7.3f}  {nc:6.1f}  {where}\n")
        out.write("-- by own time --\n")
        for ct, tt, nc, where in sorted(rows, key=lambda r: -r[1])[:14]:
            out.write(f"{ct:7.3f}  {tt:7.3f}  {nc:6.1f}  {where}\n")
    return out.getvalue()

