""".source operations under tensor parallelism: a child call is served whole; an operation on
a fragment whose placement the engine does not describe is refused on every rank."""

from __future__ import annotations

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks


def _read_operation(rank: int, path: str) -> None:
    model = nd.LanguageModel(path, tp=2)
    with model.trace("Hello world"):
        q = model.model.layers[0].self_attn.source.view_0.output.save()


def test_fragment_operation_refused_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    results = run_ranks(_read_operation, 2, path, timeout=60, expect_errors=True)
    for r in results:
        assert r[0] == "error" and r[1] == "NNsightError" and "tensor-parallel fragment" in r[2]
