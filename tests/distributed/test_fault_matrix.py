"""The fault matrix (issue 7) at tp=2, pp=2, tp=2 × pp=2 and tp=2 with dp=2: one forked
rank group per topology runs every fault of :mod:`.faults`, each followed by a correct
trace (with dp=2, a replica must be untouched by the other's one-rank faults). Each
fault must end on every rank as it does in one process (the same error, or a
``RemoteError`` naming it; for a one-rank exception, the error on its rank and a
``RemoteError`` naming that rank everywhere else; a divergence as ``DivergenceError``),
and every correct trace must equal the single-process one: nothing of a failed trace is
left to spoil the next."""

from __future__ import annotations

import time

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

from .faults import ALONE, PROMPT, sequence

TOPOLOGIES = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2_pp2": (4, 2, 2), "tp2_dp2": (4, 2, 1)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")))
    model = nd.LanguageModel(path)
    with model.trace(PROMPT):
        first = model.lm_head.output[0, -1].argmax().save()
    eos = int(first)
    return path, eos, sequence(0, model, eos)


def _rank(rank: int, path: str, tp: int, pp: int, eos: int, world: int) -> list:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    # Twice: the second round must find nothing left over by the first either.
    return sequence(rank, model, eos, world) + sequence(rank, model, eos, world)


def _same_values(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), f"{where}: {sorted(got)} vs {sorted(want)}"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{where} {name}: {m}")


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_fault_matrix(reference, topology):
    path, eos, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    start = time.monotonic()
    results = run_ranks(_rank, world, path, tp, pp, eos, world, timeout=300, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    took = time.monotonic() - start
    problems = []
    for rank, outcomes in enumerate(results):
        assert [name for name, _, _ in outcomes] == [name for name, _, _ in expected] * 2
        for (name, got, after), (_, want, want_after) in zip(outcomes, expected * 2):
            where = f"{topology} rank {rank}, {name}"
            try:
                _check(name, rank, got, want, where, world, tp * pp)
            except AssertionError as e:
                problems.append(str(e))
            try:
                assert "error" not in after, f"{where}, the trace after it: {after}"
                _same_values(after["values"], want_after["values"], f"{where}, the trace after it")
            except AssertionError as e:
                problems.append(str(e)[:600])
    assert not problems, "\n".join(problems)
    print(f"{topology}: {len(expected)} faults and their next traces, twice, in {took:.1f} s")


def _check(name: str, rank: int, got: dict, want: dict, where: str, world: int, replica: int) -> None:
    """``got`` (a rank's outcome of fault ``name``) against ``want`` (one process's). A
    one-rank fault fails its rank and, as ``RemoteError``, the rest of its replica; a
    divergent branch (``rank == 0``) the first replica. Other replicas (dp=2) are untouched
    and trace as one process does."""
    if name in ALONE:
        alone = ALONE[name] % world
        if rank == alone:
            assert got.get("error") == "ValueError", f"{where}: {got}"
            return
        if rank // replica == alone // replica:
            assert (got.get("error"), got.get("origin"), got.get("origin_error")) == \
                ("RemoteError", alone, "ValueError"), f"{where}: {got}"
            assert f"boom on rank {alone} only" in got["message"], where
            return
    if name == "a rank-divergent branch" and rank // replica == 0:
        assert got.get("error") == "DivergenceError", f"{where}: {got}"
    elif "error" in want:
        kind = got.get("origin_error") if got.get("error") == "RemoteError" else got.get("error")
        assert kind == want["error"], f"{where}: {got} (one process: {want['error']})"
    else:
        assert "error" not in got, f"{where}: {got}"
        assert got["warnings"] == want["warnings"], f"{where}: warnings {got['warnings']} vs {want['warnings']}"
        _same_values(got["values"], want["values"], where)
