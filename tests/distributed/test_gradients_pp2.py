"""Gradients under pipeline parallelism (pp=2; with dp=2 too): the backward crosses stages.

Every named value of :func:`grad_values` is computed in one process (the reference: the
one-process backward, itself compared with plain PyTorch in tests/tracing/test_backward.py)
and on forked gloo ranks at pp=2, where layers 0-1 run on stage 0 and layers 2-3, the final
norm and lm_head on stage 1. The sharded values must equal the reference within 1e-4 and
be bit-identical on every rank: a ``.grad`` is computed by its location's owner and served
to the other stage. A failure inside a backward block on one rank must raise on every rank,
and the next trace must work.
"""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

PROMPTS = ["The Eiffel Tower is in the city of", "Hello world, how are you"]


def grad_values(model, parameters: bool = True) -> dict[str, torch.Tensor]:
    """Named gradients of backward passes through both stages (``parameters``: of
    parameters too)."""
    layers = model.model.layers
    v: dict[str, torch.Tensor] = {}

    with model.trace(PROMPTS[0]):                                       # reads on both stages
        h0 = layers[0].output                                           # stage 0
        h1 = layers[1].output                                           # stage 0, sent to stage 1
        h3 = layers[3].output                                           # stage 1
        normed = model.model.norm.output                                # stage 1
        logits = model.lm_head.output
        loss = logits[0, -1].logsumexp(-1)
        with loss.backward():
            g_logits = logits.grad.save()
            g_norm = normed.grad.save()
            g3 = h3.grad.save()
            g1 = h1.grad.save()
            g0 = h0.grad.save()
    v.update(grad_logits=g_logits, grad_norm=g_norm, grad_stage1=g3, grad_sent=g1, grad_stage0=g0)

    with model.trace(PROMPTS[0]):                                       # a write on stage 1
        h0 = layers[0].output
        h2 = layers[2].output
        h3 = layers[3].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            h3.grad = h3.grad * 3
            h3.grad[:, 0] = 0
            g3 = h3.grad.save()
            g2 = h2.grad.save()
            g0 = h0.grad.save()
    v.update(write1_stage1=g3, write1_upstream_stage1=g2, write1_upstream_stage0=g0)

    with model.trace(PROMPTS[0]):                                       # a write on stage 0
        h0 = layers[0].output
        h1 = layers[1].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            h1.grad = h1.grad * -2
            g0 = h0.grad.save()
    v["write0_upstream_stage0"] = g0

    with model.trace(PROMPTS[0]):                                       # two passes, retain_graph
        h0 = layers[0].output
        h2 = layers[2].output
        logits = model.lm_head.output
        first = logits[0, -1].logsumexp(-1)
        second = logits[0, -2, 5]
        with first.backward(retain_graph=True):
            a2 = h2.grad.save()
            a0 = h0.grad.save()
        with second.backward():
            b2 = h2.grad.save()
            b0 = h0.grad.save()
    v.update(retain_first_stage1=a2, retain_first_stage0=a0, retain_second_stage1=b2, retain_second_stage0=b0)

    with model.trace() as tracer:                                       # invokes: their own rows
        with tracer.invoke(PROMPTS[0]):
            a1 = layers[1].output
            a3 = layers[3].output
            loss_a = model.lm_head.output[0, -1].logsumexp(-1)
            with loss_a.backward(retain_graph=True):
                a3.grad = a3.grad * 2
                ga = a1.grad.save()
        with tracer.invoke(PROMPTS[1]):
            b0 = layers[0].output
            loss_b = model.lm_head.output[0, -1].logsumexp(-1)
            with loss_b.backward():
                gb = b0.grad.save()
    v.update(invoke_a_stage0=ga, invoke_b_stage0=gb)

    with model.trace(PROMPTS[0]):                                       # paths outside the model
        h1 = layers[1].output
        lens = model.lm_head(model.model.norm(h1))                      # stage 1 modules on a stage-0 value
        loss = model.lm_head.output[0, -1].logsumexp(-1) + lens[0, -1].logsumexp(-1) + h1.norm()
        with loss.backward():
            g1 = h1.grad.save()
    v["body_paths_stage0"] = g1

    with model.trace(PROMPTS[0]) as tracer:                             # no owner; computed in the body
        h0 = layers[0].output
        h3 = layers[3].output
        doubled = h3 * 2
        loss = model.output.logits[0, -2].logsumexp(-1) + tracer.result.logits[0, -1].logsumexp(-1) \
            + doubled.norm()
        with loss.backward():
            g_loss = loss.grad.save()
            g_doubled = doubled.grad.save()
            g0 = h0.grad.save()
    v.update(unowned_loss=g_loss, unowned_body_tensor=g_doubled, unowned_stage0=g0)

    if parameters:
        with model.trace(PROMPTS[0]):                                   # parameters of both stages
            w0 = layers[1].mlp.down_proj.weight
            w1 = layers[3].mlp.down_proj.weight
            loss = model.lm_head.output[0, -1].logsumexp(-1)
            with loss.backward():
                gw1 = w1.grad.save()
                gw0 = w0.grad.save()
        v.update(param_stage1=gw1, param_stage0=gw0)
        model._module.zero_grad(set_to_none=True)
    return {k: t.detach().clone() for k, t in v.items()}


def _rank_values(rank: int, path: str, pp: int) -> tuple:
    """The named gradients, and whether a trace without backward kept a graph (one process
    always does, as nnsight; a sharded trace only when its body calls backward)."""
    model = nd.LanguageModel(path, pp=pp)
    values = grad_values(model)
    with model.trace(PROMPTS[0]):
        plain = model.model.layers[0].output.save()
        logits = model.lm_head.output.save()
    return values, (plain.requires_grad, logits.requires_grad)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    return path, grad_values(nd.LanguageModel(path))


def _compare(results: list, expected: dict, where: str) -> None:
    for rank, values in enumerate(results):
        assert set(values) == set(expected), f"{where} rank {rank}: {sorted(set(values) ^ set(expected))}"
        for name, want in expected.items():
            torch.testing.assert_close(values[name], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{where} rank {rank} {name}: {m}")
        for name in values:
            assert torch.equal(values[name], results[0][name]), f"{where}: {name} differs on rank {rank}"


@pytest.mark.parametrize("world", [2, 4], ids=["pp2", "pp2_dp2"])
def test_gradients_equal_one_process(reference, world):
    path, expected = reference
    # The reference itself: every write changed what it should (not a vacuous comparison).
    assert not torch.allclose(expected["write1_upstream_stage0"], expected["retain_first_stage0"])
    assert not torch.allclose(expected["write0_upstream_stage0"], expected["retain_first_stage0"])
    results = run_ranks(_rank_values, world, path, 2, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    _compare([values for values, _ in results], expected, f"pp2 world {world}")
    assert [graph for _, graph in results] == [(False, False)] * world


def _tp_pp_values(rank: int, path: str) -> dict:
    return grad_values(nd.LanguageModel(path, tp=2, pp=2))


def test_gradients_tp2_pp2(reference):
    """tp=2 × pp=2: the gradients of whole locations (layer outputs, the norm, logits, values
    the body computed) and of tensor-parallel parameters on both stages cross stages the same
    way."""
    path, expected = reference
    results = run_ranks(_tp_pp_values, 4, path, timeout=300, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    _compare(results, expected, "tp2_pp2")


def _failing_block(rank: int, path: str, fails_on: int) -> tuple:
    model = nd.LanguageModel(path, pp=2)
    layers = model.model.layers
    outcome: dict = {}
    try:
        with model.trace(PROMPTS[0]):
            h0 = layers[0].output
            h3 = layers[3].output
            loss = model.lm_head.output[0, -1].logsumexp(-1)
            with loss.backward():
                h3.grad.save()
                if model.topology.rank == fails_on:
                    raise ValueError(f"boom on rank {fails_on} only")
                h0.grad.save()
        outcome["error"] = None
    except Exception as error:
        outcome = {"error": type(error).__name__, "origin": getattr(error, "rank", None), "message": str(error)}
    return outcome, grad_values(model)


@pytest.mark.parametrize("fails_on", [0, 1], ids=["stage0", "stage1"])
def test_error_in_a_backward_block_on_one_rank(reference, fails_on):
    path, expected = reference
    results = run_ranks(_failing_block, 2, path, fails_on, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    for rank, (outcome, _) in enumerate(results):
        if rank == fails_on:
            assert outcome["error"] == "ValueError", outcome
        else:
            assert (outcome["error"], outcome["origin"]) == ("RemoteError", fails_on), outcome
            assert f"boom on rank {fails_on} only" in outcome["message"]
    _compare([values for _, values in results], expected, f"after a failure on rank {fails_on}")


def _stop_in_backward(model, layer: int):
    """``tracer.stop()`` inside a backward block, after reading the gradient of ``layer``."""
    with model.trace(PROMPTS[0]) as tracer:
        h = model.model.layers[layer].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            g = h.grad.save()
            tracer.stop()
    return g


def stop_on_stage1(model):
    return _stop_in_backward(model, 3)


def stop_on_stage0(model):
    return _stop_in_backward(model, 0)


def earlier_first(model):
    with model.trace(PROMPTS[0]):
        h0 = model.model.layers[0].output
        h3 = model.model.layers[3].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            h0.grad.save()
            h3.grad.save()  # stage 1's, passed before stage 0's backward began


def plain_backward(model):
    with model.trace(PROMPTS[0]):
        h0 = model.model.layers[0].output
        h0.retain_grad()
        loss = model.lm_head.output.sum()
        loss.backward()
        g0 = h0.grad.save()
    return g0


def back_to_a_later_stage(model):
    with model.trace(PROMPTS[0]):
        h3 = model.model.layers[3].output
        mixed = model.model.layers[0].mlp(h3)  # a stage-0 module on a stage-1 value
        loss = mixed.sum() + model.lm_head.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
    return g3


def written_body_tensor(model):
    """A tensor the body computed, written into stage 0's model: its gradient is split."""
    with model.trace(PROMPTS[0]):
        doubled = model.model.layers[0].output * 2
        model.model.layers[0].output = doubled
        loss = model.lm_head.output.sum() + doubled.sum()
        with loss.backward():
            g = doubled.grad.save()
    return g


def under_generate(model):
    with model.generate(PROMPTS[0], max_new_tokens=2, do_sample=False):
        loss = model.lm_head.output.sum()
        with loss.backward():
            pass


def _block_in_a_helper(loss, h):
    with loss.backward():
        g = h.grad.save()
    return g


def block_in_a_helper(model):
    """The body does not show `.backward(`: a sharded trace runs under no_grad."""
    with model.trace(PROMPTS[0]):
        h1 = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        g1 = _block_in_a_helper(loss, h1).save()
    return g1


SCENARIOS = [stop_on_stage1, stop_on_stage0, earlier_first, plain_backward, back_to_a_later_stage, under_generate,
             block_in_a_helper, written_body_tensor]
#: Scenario -> (the error it raises under pp on some rank (the others: RemoteError), whether
#: one process raises it too).
REFUSED = {earlier_first: ("OutOfOrderError", True), under_generate: ("NoGradientError", True),
           plain_backward: ("NNsightError", False), back_to_a_later_stage: ("NNsightError", False),
           block_in_a_helper: ("NoGradientError", False), written_body_tensor: ("NNsightError", False)}


def _outcomes(model) -> list:
    """Each scenario's value or error type, then a correct trace's gradient."""
    found = []
    for scenario in SCENARIOS:
        try:
            found.append(scenario(model).detach().clone())
        except Exception as error:
            found.append(type(error).__name__ if not isinstance(error, nd.RemoteError) else "RemoteError")
        model._module.zero_grad(set_to_none=True)
        found.append(grad_values_short(model))
    return found


def grad_values_short(model) -> torch.Tensor:
    with model.trace(PROMPTS[0]):
        h0 = model.model.layers[0].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            g0 = h0.grad.save()
    return g0.detach().clone()


def _rank_outcomes(rank: int, path: str) -> list:
    return _outcomes(nd.LanguageModel(path, pp=2))


def test_stops_and_errors_in_blocks(reference):
    """``stop()`` inside a block on either stage ends the trace on every rank with what it
    had; an out-of-order gradient raises ``OutOfOrderError`` as in one process (on some rank;
    the others a ``RemoteError``), a block under ``generate`` ``NoGradientError``. Refused under
    pp (one process computes them): ``loss.backward()`` as a statement (it would stop at the
    stage's boundary), a gradient that would flow back to a later stage, a block the body does
    not show (the trace ran under no_grad), the gradient of a body tensor written into stage
    0's model (part of it is stage 0's). Each is followed by a correct trace."""
    path, _ = reference
    expected = _outcomes(nd.LanguageModel(path))
    results = run_ranks(_rank_outcomes, 2, path, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "60"})
    refused = {2 * SCENARIOS.index(scenario): error for scenario, (error, _) in REFUSED.items()}
    for rank, found in enumerate(results):
        for i, (got, want) in enumerate(zip(found, expected)):
            where = f"rank {rank}, item {i}"
            if i in refused:
                assert got in (refused[i], "RemoteError"), (where, got)
                alike = REFUSED[SCENARIOS[i // 2]][1]
                assert want == refused[i] if alike else isinstance(want, torch.Tensor), (where, want)
                continue
            assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), f"{where}: {got}, {want}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            assert torch.equal(got, results[0][i]), where
    for i, error in refused.items():
        assert error in [found[i] for found in results], (i, [found[i] for found in results])
