"""Faults that need rank groups of their own (the rest are in the fault matrix,
``test_fault_matrix.py``): a value that never comes (a timeout), after which the next
trace equals one process, and a killed rank, which ends every survivor with an error.
Each group runs inside the test's own timeout (no hang)."""

from __future__ import annotations

import os
import time

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

TOPOLOGIES = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2_pp2": (4, 2, 2)}
ENV = {"NNSIGHT_DIST_TIMEOUT": "6"}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _outcome(result) -> str:
    return result[1] if isinstance(result, tuple) and result[0] == "error" else ("died" if isinstance(result, tuple) else "ok")


def _killed(rank: int, path: str, tp: int, pp: int) -> None:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    with model.trace("Hello world"):
        h = model.model.layers[0].output.save()
        if rank == 1:
            os._exit(3)
        logits = model.lm_head.output.save()


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_killed_rank(path, topology):
    world, tp, pp = TOPOLOGIES[topology]
    start = time.monotonic()
    results = run_ranks(_killed, world, path, tp, pp, timeout=90, env=ENV, expect_errors=True)
    assert results[1] == ("died", 3)
    survivors = [_outcome(r) for i, r in enumerate(results) if i != 1]
    assert all(o in ("RemoteError", "RouterTimeout") for o in survivors), survivors
    assert time.monotonic() - start < 60


def _correct(model) -> torch.Tensor:
    with model.trace("Hello world"):
        logits = model.lm_head.output.save()
    return logits


def _never_comes(rank: int, path: str, tp: int, pp: int) -> tuple:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    stalled = model.topology.pp_rank == pp - 1  # the last stage (all its tp ranks alike)
    try:
        with model.trace("Hello world"):
            h = model.model.layers[0].output.save()
            if stalled:
                time.sleep(8)  # past the 6 s timeout: rank 0 gives up waiting
            logits = model.lm_head.output.save()
        outcome = ("ok", "")
    except nd.NNsightError as e:
        outcome = (type(e).__name__, str(e))
    return outcome, _correct(model)


@pytest.mark.parametrize("topology", ["pp2", "tp2_pp2"])
def test_value_that_never_comes(path, topology):
    """A stage that stalls past the timeout: the stage waiting for it raises
    ``RouterTimeout`` naming what it waited for, the stalled stage the same error (or a
    ``RemoteError``), and the next trace equals one process."""
    world, tp, pp = (2, 1, 2) if topology == "pp2" else (4, 2, 2)
    results = run_ranks(_never_comes, world, path, tp, pp, timeout=120, env=ENV)
    sender = world - tp  # the last stage's rank of tp rank 0
    (first, message), _ = results[0]
    assert first == "RouterTimeout"
    assert f"for logits from rank {sender}" in message
    assert f"waits for model.lm_head.output (request 1) from rank {sender}" in message
    for (outcome, _), _ in results[1:]:
        assert outcome in ("RouterTimeout", "RemoteError")
    expected = _correct(nd.LanguageModel(path))
    for rank, (_, logits) in enumerate(results):
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank}: {m}")


def _stalls_in_engine(rank: int, path: str) -> None:
    model = nd.LanguageModel(path, tp=2)
    with model.trace("Hello world"):
        h = model.model.layers[0].output.save()
        if rank == 1:
            time.sleep(8)
        logits = model.lm_head.output.save()


def test_value_that_never_comes_tp2(path):
    """Under tp a stalled rank stalls the engine's own collective: the others' wait in it
    ends at the timeout, as ``RouterTimeout`` (see distributed.md, Failures)."""
    results = run_ranks(_stalls_in_engine, 2, path, timeout=90, env=ENV, expect_errors=True)
    assert _outcome(results[0]) == "RouterTimeout"
    assert _outcome(results[1]) in ("RouterTimeout", "RemoteError")
