"""Faults on real forked ranks: each ends with its named error on every surviving rank,
inside the test's own timeout (no hang)."""

from __future__ import annotations

import os
import time

import pytest

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

TOPOLOGIES = {"tp2": (2, 2, 1), "pp2": (2, 1, 2)}
ENV = {"NNSIGHT_DIST_TIMEOUT": "6"}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _outcome(result) -> str:
    return result[1] if isinstance(result, tuple) and result[0] == "error" else ("died" if isinstance(result, tuple) else "ok")


def _one_rank_raises(rank: int, path: str, tp: int, pp: int, model=None) -> str:
    model = model or nd.LanguageModel(path, tp=tp, pp=pp)
    try:
        with model.trace("Hello world"):
            x = model.model.layers[0].mlp.input
            if rank == 1:
                raise ValueError("boom on one rank")
            y = model.model.layers[0].mlp.down_proj.output.save()
            logits = model.lm_head.output.save()
    except nd.RemoteError as e:
        assert e.rank == 1 and "boom on one rank" in str(e), str(e)
        raise


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_exception_on_one_rank(path, topology):
    world, tp, pp = TOPOLOGIES[topology]
    start = time.monotonic()
    results = run_ranks(_one_rank_raises, world, path, tp, pp, timeout=60, env=ENV, expect_errors=True)
    assert [_outcome(r) for r in results] == ["RemoteError", "ValueError"]
    assert time.monotonic() - start < 60


def _divergent(rank: int, path: str, tp: int, pp: int) -> None:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    with model.trace("Hello world"):
        if rank == 0:
            extra = model.model.layers[1].output.save()
        h = model.model.layers[3].output.save()


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_rank_divergent_branch(path, topology):
    world, tp, pp = TOPOLOGIES[topology]
    results = run_ranks(_divergent, world, path, tp, pp, timeout=60, env=ENV, expect_errors=True)
    assert [_outcome(r) for r in results] == ["DivergenceError", "DivergenceError"]


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
    results = run_ranks(_killed, world, path, tp, pp, timeout=60, env=ENV, expect_errors=True)
    assert results[1] == ("died", 3)
    assert _outcome(results[0]) == "RemoteError"


def _never_comes(rank: int, path: str, tp: int, pp: int) -> None:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    with model.trace("Hello world"):
        h = model.model.layers[0].output.save()
        if rank == 1:
            time.sleep(8)  # past the 6 s timeout: rank 0 gives up waiting
        logits = model.lm_head.output.save()


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_value_that_never_comes(path, topology):
    world, tp, pp = TOPOLOGIES[topology]
    results = run_ranks(_never_comes, world, path, tp, pp, timeout=60, env=ENV, expect_errors=True)
    assert _outcome(results[0]) == "RouterTimeout"
    assert _outcome(results[1]) in ("RouterTimeout", "RemoteError")
    if topology == "pp2":  # the message names what was awaited, from whom, and who waits for what
        assert "for logits from rank 1" in results[0][2]
        assert "waits for model.lm_head.output (request 1) from rank 1" in results[0][2]


def _after_failure(rank: int, path: str) -> str:
    model = nd.LanguageModel(path, tp=2)
    try:
        _one_rank_raises(rank, path, 2, 1, model)
    except (ValueError, nd.RemoteError):
        pass
    with model.trace("Hello world"):
        z = model.lm_head.output.save()


def test_trace_after_a_one_rank_failure_tp2(path):
    results = run_ranks(_after_failure, 2, path, timeout=60, env=ENV, expect_errors=True)
    # the process group is gone on the failed rank: it says so instead of a bare RuntimeError
    assert results[1][0] == "error" and results[1][1] == "RemoteError" and "torn down" in results[1][2]
    assert results[0][0] == "error" and results[0][1] in ("RemoteError", "RouterTimeout")
