"""Conformance: the same named values in one process and on sharded topologies.

Every hard case of DESIGN.md §5 is a named value of ``scenarios.trace_values``; each
topology runs it on real forked gloo ranks and must match the single-process values within
1e-4 relative, and be bit-identical across the ranks of the run. At world size 8
(tp=2 × pp=2 × dp=2) the replicas also trace prompts of their own, each compared with one
process on that prompt.
"""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

from .scenarios import PROMPTS, assert_conformance, trace_values

TOPOLOGIES = {  # name: (world, tp, pp)
    "tp2": (2, 2, 1),
    "pp2": (2, 1, 2),
    "tp2_pp2": (4, 2, 2),
    "tp2_dp2": (4, 2, 1),
    "tp2_pp2_dp2": (8, 2, 2),
}


def _rank_values(rank: int, path: str, tp: int, pp: int) -> dict:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    return trace_values(model)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    return path, trace_values(nd.LanguageModel(path))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_conformance(reference, topology):
    path, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    results = run_ranks(_rank_values, world, path, tp, pp, timeout=180, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    assert len(expected) >= 20
    # Replicas of one run agree bit for bit too (dp replicas trace the same inputs here).
    assert_conformance(results, expected, tp * pp, topology)


def _replica_values(rank: int, path: str) -> dict:
    """Each dp replica traces its own prompt: reads on both stages, an edit, and generation."""
    model = nd.LanguageModel(path, tp=2, pp=2)
    return _own_prompt_values(model, PROMPTS[model.topology.dp_rank])


def _own_prompt_values(model, prompt: str) -> dict:
    layers = model.model.layers
    with model.trace(prompt):
        h0 = layers[0].output.save()
        h3 = layers[3].output.save()
    with model.trace(prompt):
        layers[1].mlp.output[:] = 0
        edited = model.lm_head.output.save()
    with model.generate(prompt, max_new_tokens=2, do_sample=False) as tracer:
        tokens = tracer.result.save()
    return {"stage0": h0, "stage1": h3, "edited_logits": edited, "generated": tokens}


def test_replicas_trace_their_own_prompts(reference):
    """tp=2 × pp=2 × dp=2: replica d traces PROMPTS[d] and must match one process on that
    prompt (the two prompts differ in length, so mixing replicas cannot pass)."""
    path, _ = reference
    model = nd.LanguageModel(path)
    expected = [_own_prompt_values(model, prompt) for prompt in PROMPTS]
    assert expected[0]["stage0"].shape != expected[1]["stage0"].shape
    results = run_ranks(_replica_values, 8, path, timeout=180, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    for rank, values in enumerate(results):
        want = expected[rank // 4]
        for name in want:
            torch.testing.assert_close(values[name], want[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
            assert torch.equal(values[name], results[rank // 4 * 4][name]), f"{name} differs on rank {rank}"
