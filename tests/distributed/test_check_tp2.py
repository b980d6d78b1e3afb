"""Check mode at tp=2 (``NNSIGHT_DIST_CHECK``): a value served as whole that differs between
the ranks of its tensor-parallel group is an error naming the location and the ranks."""

from __future__ import annotations

import os

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks


def _perturbed(rank: int, path: str) -> list:
    model = nd.LanguageModel(path, tp=2)
    layers = model.model.layers
    shift = float(model.topology.tp_rank)  # a rank-local edit: what check mode is for

    def trace():
        with model.trace("Hello world"):
            layers[0].output[:, -1] += shift
            h = layers[1].output.save()
        return h

    os.environ["NNSIGHT_DIST_CHECK"] = "0"
    unchecked = trace()  # served, silently different on each rank
    os.environ["NNSIGHT_DIST_CHECK"] = "1"
    try:
        trace()
    except nd.DivergenceError as e:
        return [unchecked, str(e)]
    return [unchecked, None]


def test_check_mode_names_location_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    results = run_ranks(_perturbed, 2, path, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    assert not (results[0][0] == results[1][0]).all()  # without check mode nothing is said
    for _, message in results:
        assert message is not None and "model.model.layers.1.output" in message and "[0] vs [1]" in message
