"""Real ranks for tests: fork a group of processes that start ``torch.distributed`` on gloo.

``run_ranks(fn, world)`` forks ``world`` children of the (already imported) test process,
sets the variables ``torchrun`` would set, and calls ``fn(rank, *args)`` in each; it returns
every rank's result, or raises :class:`RanksFailed` with each rank's traceback. Forking
from an imported parent costs a fraction of a second per group. Every group runs under
its own timeout: children still alive at the deadline are killed and the call fails.

Results travel back to the parent as ``torch.save`` bytes, loaded with
``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch


class RanksFailed(AssertionError):
    """Some ranks raised, hung or died; ``errors`` maps rank -> (exception type name, traceback)."""

    def __init__(self, message: str, errors: dict[int, tuple[str, str]]):
        super().__init__(message)
        self.errors = errors


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, env: dict, args: tuple, out: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    from ..distributed import topology

    topology._TOPOLOGY = None
    try:
        try:
            result = ("ok", fn(rank, *args))
        except BaseException as e:  # reported to the parent, which raises
            result = ("error", (type(e).__name__, "".join(traceback.format_exception(e))))
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, buffer.getvalue()))
    finally:
        out.close()
        out.join_thread()  # the queue's feeder thread must flush before os._exit
        topology._shutdown()
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0,
              env: dict | None = None, expect_errors: bool = False) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world`` forked ranks; the list of their results by rank.

    With ``expect_errors`` a rank's exception is returned as ``("error", type name,
    traceback)`` and a rank that exited without a result as ``("died", exit code)`` instead
    of failing the call; a rank that hangs past ``timeout`` always fails it.
    """
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, env or {}, args, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, payload = out.get(timeout=0.2)
            results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and out.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
    died = {r: procs[r].exitcode for r in range(world)
             if r not in results and procs[r].exitcode not in (None, -9) and expect_errors}
    for r, code in died.items():
        results[r] = ("died", code)
    missing = [r for r in range(world) if r not in results]
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    if missing:
        raise RanksFailed(f"ranks {missing} hung or died (timeout {timeout:g} s); errors: "
                          + "; ".join(f"rank {r}: {t}" for r, (t, _) in errors.items()), errors)
    if errors and not expect_errors:
        first = min(errors)
        raise RanksFailed(f"rank {first} raised {errors[first][0]}:\n{errors[first][1]}", errors)
    return [("error", *results[r][1]) if results[r][0] == "error"
            else ("died", results[r][1]) if results[r][0] == "died" else results[r][1] for r in range(world)]
