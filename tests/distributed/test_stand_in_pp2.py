"""Modules run on every pipeline stage (the rotary embedding): on the stages after the first
their first argument is the embedding placeholder's zeros, so it is refused on every rank
(never shown; a cache of every module holds a refused stand-in for it), while their output
(cos, sin of the positions) and the model's values still equal one process, and the next
trace works."""

from __future__ import annotations

import torch

import nnsight_dist as nd
from nnsight_dist.intervention.errors import NNsightError
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "The Eiffel Tower is in the city of"


def _values(model) -> dict:
    out = {}
    try:
        with model.trace(PROMPT):
            model.model.rotary_emb.inputs[0][0].clone().save()
        out["input"] = "served"
    except NNsightError as error:
        out["input"] = str(error)
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(include_inputs=True)
        cos = model.model.rotary_emb.output[0].save()
        logits = model.lm_head.output.save()
    out["cos"], out["logits"] = cos.clone(), logits.clone()
    out["cached_positions"] = cache["model.model.rotary_emb"].inputs[1]["position_ids"].clone()
    out["cached_norm"] = cache["model.model.norm"].output.clone()
    return out


def _ranks(rank: int, path: str) -> dict:
    return _values(nd.LanguageModel(path, pp=2))


def test_every_stage_module_input_refused_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    want = _values(nd.LanguageModel(path))
    assert want["input"] == "served"
    for rank, got in enumerate(run_ranks(_ranks, 2, path, timeout=180)):
        assert "stand-in" in got["input"] and "rotary_emb" in got["input"], (rank, got["input"])
        for name in ("cos", "logits", "cached_positions", "cached_norm"):
            torch.testing.assert_close(got[name], want[name], msg=lambda m: f"rank {rank} {name}: {m}")
