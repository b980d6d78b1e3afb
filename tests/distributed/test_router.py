"""Router traffic at pp=2: nothing for interventions when no value crosses stages, one
message per served value per other stage otherwise; the engine's own transfers ride along."""

from __future__ import annotations

import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks


def _traffic(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, pp=2)
    router = model.interleaver.seam.router
    seen = {}
    with model.trace("Hello world"):
        pass
    seen["empty"] = dict(router.traffic)
    with model.trace("Hello world"):
        a = model.model.layers[0].output.save()                  # stage 0
    seen["one_stage0_read"] = dict(router.traffic)
    with model.trace("Hello world"):
        a = model.model.layers[0].output.save()                  # stage 0
        model.model.layers[2].output = a * 2                     # a write: no message
        b = model.model.layers[3].mlp.output.save()              # stage 1
        c = model.model.layers[3].mlp.output.sum().save()        # the same visit again
    seen["reads_and_write"] = dict(router.traffic)
    with model.trace("Hello world"):
        out = model.output.logits.save()                         # every stage computes it
    seen["replicated"] = dict(router.traffic)
    return seen


def test_router_traffic_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    stage0, stage1 = run_ranks(_traffic, 2, path, timeout=120)
    hidden = {"h": stage0["empty"]["h"]}
    assert hidden["h"][0] == 1 and "v" not in stage0["empty"] and "v" not in stage1["empty"]
    assert stage1["empty"] == {"logits": stage1["empty"]["logits"]} and stage1["empty"]["logits"][0] == 1
    assert stage0["one_stage0_read"]["v"][0] == 1 and "v" not in stage1["one_stage0_read"]
    # stage 0 serves layer 0 once; stage 1 serves its mlp output twice (two requests)
    assert stage0["reads_and_write"]["v"][0] == 1 and stage1["reads_and_write"]["v"][0] == 2
    assert "v" not in stage0["replicated"] and "v" not in stage1["replicated"]


def _two_models(rank: int, path: str) -> dict:
    first = nd.LanguageModel(path, pp=2)
    second = nd.LanguageModel(path, pp=2)
    with first.trace("Hello world"):
        a = first.model.layers[3].output.save()
    with second.trace("Hello world"):
        b = second.model.layers[0].output.save()
    with first.trace("Hello world"):
        c = first.model.layers[3].output.save()
    return {"a": a, "b": b, "c": c}


def test_two_models_share_the_router_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    results = run_ranks(_two_models, 2, path, timeout=120)
    reference = nd.LanguageModel(path)
    with reference.trace("Hello world"):
        b = reference.model.layers[0].output.save()
        a = reference.model.layers[3].output.save()
    for r in results:
        assert torch.equal(r["a"], a) and torch.equal(r["c"], a) and torch.equal(r["b"], b)
