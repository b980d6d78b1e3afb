"""Ad-hoc calls across pipeline stages (DESIGN.md §5, "two kinds of remote value").

The logit lens calls ``lm_head(norm(h))`` (last stage) right after reading each layer's
output (every stage): the caller waits for the owner's result inside its visit. Each
topology runs the same bodies on real forked gloo ranks and must give the single-process
values within 1e-4 relative, bit-identical across the ranks of the run.
"""

from __future__ import annotations

import time

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

PROMPTS = ["The Eiffel Tower is in the city of", "Hello world"]
TOPOLOGIES = {"pp2": (2, 1, 2), "tp2_pp2": (4, 2, 2)}  # name: (world, tp, pp)
ENV = {"NNSIGHT_DIST_TIMEOUT": "60"}


def lens_values(model) -> dict[str, torch.Tensor]:
    """The logit lens and other ad-hoc calls across stages, on a tiny 4-layer model."""
    layers = model.model.layers
    v: dict[str, torch.Tensor] = {}

    with model.trace(PROMPTS[0]):                                     # the natural logit lens
        lens = nd.save([])
        for layer in layers:
            h = layer.output
            lens.append(model.lm_head(model.model.norm(h)).save())
    v["lens"] = torch.stack(lens)

    with model.trace(PROMPTS[0]):                                     # a saved list, argmax tokens
        probs = nd.save([])
        tokens = nd.save([])
        for layer in layers:
            logits = model.lm_head(model.model.norm(layer.output))
            probs.append(logits.softmax(-1)[0, -1])
            tokens.append(logits.argmax(-1)[0])
    v["lens_probs"] = torch.stack(probs)
    v["lens_tokens"] = torch.stack(tokens)

    with model.trace() as tracer:                                     # two invokes, batched
        with tracer.invoke(PROMPTS[0]):
            a = nd.save([model.lm_head(model.model.norm(layer.output))[:, -1] for layer in layers])
        with tracer.invoke(PROMPTS[1]):
            b = nd.save([model.lm_head(model.model.norm(layer.output))[:, -1] for layer in layers])
            out = model.lm_head.output.save()
    v["lens_invoke_a"] = torch.stack(a)
    v["lens_invoke_b"] = torch.stack(b)
    v["lens_invoke_b_logits"] = out

    with model.trace(PROMPTS[0]):                                     # a parameter of the last stage
        weight = model.lm_head.weight
        by_weight = nd.save([model.model.norm(layer.output) @ weight.T for layer in layers])
    v["lens_by_weight"] = torch.stack(by_weight)

    with model.trace(PROMPTS[0]):                                     # a stage-0 module from stage-1 code,
        h3 = layers[3].output                                         # then the last stage's modules on it
        mlp0 = layers[0].mlp(h3).save()
        back = model.lm_head(model.model.norm(mlp0)).save()
        logits = model.lm_head.output.save()
    v.update(stage0_call_from_stage1=mlp0, stage1_call_of_stage0_result=back, stage0_call_logits=logits)

    with model.trace(PROMPTS[0]):                                     # fragmented modules of the other
        act0 = layers[0].mlp.act_fn.output                            # stage: arguments cut (rowwise),
        row1 = layers[3].mlp.down_proj(act0).save()                   # results gathered (colwise)
        col0 = layers[0].mlp.up_proj(layers[3].output).save()
    v.update(stage1_rowwise_call=row1, stage0_colwise_call=col0)

    with model.generate(PROMPTS[1], max_new_tokens=2, do_sample=False) as tracer:
        steps = nd.save([])                                           # the lens at every step
        for _ in tracer.iter[:2]:
            steps.append(torch.stack([model.lm_head(model.model.norm(layers[i].output))[:, -1] for i in (0, 3)]))
        generated = tracer.result.save()
    v["lens_generate"] = torch.stack(steps)
    v["lens_generate_tokens"] = generated

    with model.trace(PROMPTS[0]):                                     # an edit fed by a lens value
        early = model.lm_head(model.model.norm(layers[0].output))
        layers[1].output[:] = layers[1].output + early[..., : model.config.hidden_size] * 0.01
        edited = model.lm_head.output.save()
    v["lens_then_edit_logits"] = edited
    return {k: t.detach().clone() for k, t in v.items()}


def _rank_values(rank: int, path: str, tp: int, pp: int) -> dict:
    return lens_values(nd.LanguageModel(path, tp=tp, pp=pp))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    return path, lens_values(nd.LanguageModel(path))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_logit_lens(reference, topology):
    path, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    results = run_ranks(_rank_values, world, path, tp, pp, timeout=240, env=ENV)
    for rank, values in enumerate(results):
        assert set(values) == set(expected), f"{topology} rank {rank}"
        for name, want in expected.items():
            torch.testing.assert_close(values[name], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{topology} rank {rank} {name}: {m}")
            assert torch.equal(values[name], results[0][name]), f"{topology}: {name} differs on rank {rank}"


def _owner_raises(rank: int, path: str, tp: int, pp: int) -> tuple:
    """An ad-hoc call that fails on its owner (the last stage), then a trace that works."""
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    error = None
    try:
        with model.trace(PROMPTS[0]):
            h = model.model.layers[0].output
            bad = model.lm_head(h[..., :3]).save()                    # wrong width: fails on the owner
    except Exception as e:  # every rank must raise; which error is checked by the test
        error = (type(e).__name__, str(e), getattr(e, "rank", None))
    with model.trace(PROMPTS[0]):
        lens = nd.save([model.lm_head(model.model.norm(layer.output)) for layer in model.model.layers])
    return error, torch.stack(lens)


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_error_in_the_owners_call(reference, topology):
    path, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    with pytest.raises(RuntimeError) as single:                        # what one process raises
        model = nd.LanguageModel(path)
        with model.trace(PROMPTS[0]):
            model.lm_head(model.model.layers[0].output[..., :3]).save()
    results = run_ranks(_owner_raises, world, path, tp, pp, timeout=240, env=ENV)
    owners = range(world - tp, world)
    for rank, (error, lens) in enumerate(results):
        assert error is not None, f"{topology} rank {rank} raised nothing"
        # An owner raises the call's own error, unless its tp peer's published error reached
        # it first; every other rank raises RemoteError naming an owner and the error.
        if not (rank in owners and error[0] == type(single.value).__name__):
            assert error[0] == "RemoteError" and error[2] in owners, error
            assert f"{type(single.value).__name__}: mat1 and mat2" in error[1], error
        torch.testing.assert_close(lens, expected["lens"], rtol=1e-4, atol=1e-5)


def _owner_slow(rank: int, path: str) -> None:
    model = nd.LanguageModel(path, pp=2)
    with model.trace(PROMPTS[0]):
        h = model.model.layers[0].output
        if rank == 1:
            time.sleep(8)  # past the 6 s timeout: rank 0 gives up waiting for the call
        logits = model.lm_head(model.model.norm(h)).save()


def test_ad_hoc_call_timeout_pp2(reference):
    path, _ = reference
    results = run_ranks(_owner_slow, 2, path, timeout=60, env={"NNSIGHT_DIST_TIMEOUT": "6"}, expect_errors=True)
    kind, message = results[0][1], results[0][2]
    assert kind == "RouterTimeout", results[0]
    # names the call's module, the waiting mediator and the rank expected to send
    assert "ad-hoc call of model.model.norm (request 1 of trace body) from rank 1" in message, message
    assert results[1][1] in ("RouterTimeout", "RemoteError"), results[1]


def _spanning_call(rank: int, path: str) -> tuple:
    """An ad-hoc call of the base model (its layers run on both stages), then a lens."""
    model = nd.LanguageModel(path, pp=2)
    error = None
    try:
        with model.trace(PROMPTS[0]):
            h = model.model.embed_tokens.output
            whole = model.model(inputs_embeds=h).last_hidden_state.save()
    except Exception as e:
        error = (type(e).__name__, str(e))
    with model.trace(PROMPTS[0]):
        lens = nd.save([model.lm_head(model.model.norm(layer.output)) for layer in model.model.layers])
    return error, torch.stack(lens)


def test_call_of_a_module_spanning_stages_is_refused_pp2(reference):
    """In one process the call runs; at pp=2 every rank holds placeholders for the other
    stage's layers, so a call would give a wrong value: it is refused on every rank."""
    path, expected = reference
    model = nd.LanguageModel(path)
    with model.trace(PROMPTS[0]):
        h = model.model.embed_tokens.output
        whole = model.model(inputs_embeds=h).last_hidden_state.save()
    assert whole.shape[-1] == model.config.hidden_size
    for error, lens in run_ranks(_spanning_call, 2, path, timeout=120, env=ENV):
        # Each rank refuses the call itself, or first hears of the other rank's refusal.
        assert error is not None and error[0] in ("NNsightError", "RemoteError"), error
        assert "model.model spans pipeline stages" in error[1], error
        torch.testing.assert_close(lens, expected["lens"], rtol=1e-4, atol=1e-5)
