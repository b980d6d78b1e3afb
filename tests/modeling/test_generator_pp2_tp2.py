"""``model.generator`` on many ranks: the generated ids and the streamer's per-step tokens
are those of a single-process run of the same weights, on every rank (pp=2, tp=2 x pp=2)."""

from __future__ import annotations

import warnings

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

PROMPTS = ["Hello world", "Hi"]


def generator_values(model) -> dict:
    with model.generate(PROMPTS, max_new_tokens=3, do_sample=False) as tracer:
        steps = nd.save([])
        for step in tracer.iter[0:4]:
            steps.append(model.generator.streamer.output)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ids = model.generator.output.save()
        result = tracer.result.save()
    return {"prompt": steps[0], "new": torch.stack(steps[1:], -1), "ids": ids, "result": result}


def _rank_values(rank: int, path: str, tp: int, pp: int) -> dict:
    return generator_values(nd.LanguageModel(path, tp=tp, pp=pp))


@pytest.mark.parametrize("world,tp,pp", [(2, 1, 2), (4, 2, 2)], ids=["pp2", "tp2_pp2"])
def test_generator_on_ranks(tiny_dirs, world, tp, pp):
    path = tiny_dirs["llama"]
    expected = generator_values(nd.LanguageModel(path))
    assert torch.equal(expected["new"], expected["ids"][:, -3:])
    results = run_ranks(_rank_values, world, path, tp, pp, timeout=180, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    for rank, values in enumerate(results):
        assert set(values) == set(expected)
        for name, want in expected.items():
            assert torch.equal(values[name], want), f"rank {rank} {name}"
