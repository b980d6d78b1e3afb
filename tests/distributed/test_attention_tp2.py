"""The attention's output at tp=2: a tuple whose weights are a shard along the heads. Read,
cached (whole and sharded) and edited, it matches one process on the same weights."""

from __future__ import annotations

import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "The Eiffel Tower is in the city of"


def _values(model) -> dict:
    attn = model.model.layers[0].self_attn
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[attn])
        sharded = tracer.cache(modules=[attn], sharded=True)
        attn.output = (attn.output[0] * 0.5, attn.output[1])   # an edit of the whole element
        logits = model.lm_head.output.save()
    gathered = sharded.gather(dst=0) if model.topology.tp > 1 else sharded
    v = {"cached": cache[attn.path].output[1], "logits": logits,
         "placement": model.placement(attn.path).output}
    if gathered is not None:
        v["sharded"] = gathered[attn.path].output[1]
    return v


def _rank(rank: int, path: str) -> dict:
    return _values(nd.LanguageModel(path, tp=2, attn_implementation="eager"))


def test_attention_weights_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    single = _values(nd.LanguageModel(path, attn_implementation="eager"))
    assert single["cached"].shape[1] == 4  # every head
    results = run_ranks(_rank, 2, path, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    for rank, got in enumerate(results):
        assert got["placement"] == "(whole, shard(1))"
        for name in ("cached", "logits") + (("sharded",) if rank == 0 else ()):
            torch.testing.assert_close(got[name], single[name] if name != "sharded" else single["cached"],
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")
