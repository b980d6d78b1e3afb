"""The soak (``benchmarks/soak.py``) in small: 100 traces at tp=2 x pp=2 on 4 forked ranks,
correct traces mixed with faults of the fault matrix (seed 0). Every correct trace must
equal the single-process reference (the checkpoint loaded plainly with transformers,
driven by forward hooks) and be bit-identical across ranks, every fault must raise on every
rank (stops and the cut loop end normally with the reference's values), resident memory
must grow < 5 % over the second half, and nothing may hang."""

from __future__ import annotations

import os
import sys

import pytest

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import soak  # noqa: E402

KINDS = list(soak.FAULTS)
TRACES = 100
TIMEOUT = 20  # seconds, any wait of nnsight_dist (NNSIGHT_DIST_TIMEOUT)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def test_soak_tp2_pp2(path):
    results = run_ranks(soak.soak, 4, path, TRACES, 0, KINDS, 2, 2, TIMEOUT, timeout=240,
                        env={"NNSIGHT_DIST_TIMEOUT": str(TIMEOUT)})
    for rank, summary in enumerate(results):
        assert summary["traces"] == TRACES, (rank, summary["lost"])
        assert summary["failures"] == [], (rank, summary["failures"][:5], summary["first_errors"])
        assert summary["growth"] is not None and summary["growth"] < soak.GROWTH_LIMIT
    kinds = results[0]["kinds"]
    assert all(kinds[k]["count"] > 0 for k in soak.CORRECT), kinds   # every correct body ran
    assert sum(kinds[k]["count"] for k in KINDS) > TRACES // 4, kinds  # and faults among them
    for kind in KINDS:  # a fault that raises does so on every rank, each time it ran
        v = kinds[kind]
        assert v["ok"] == v["count"], (kind, v)
        if kind not in soak.RETURNING:
            assert sum(v["errors"].values()) == 4 * v["count"], (kind, v)
