"""Gradients under tensor parallelism: ``with loss.backward():`` at tp=2 (and tp=2 x dp=2).

The same intervention code runs in one process (the reference: nnsight_dist's one-process
backward, itself tested against plain PyTorch in tests/tracing/test_backward.py) and on
forked gloo ranks with transformers' own tensor-parallel engine; every named gradient must
match within 1e-4 and be bit-identical across the ranks of a tensor-parallel group. The
locations cover each placement: a whole value (a decoder layer's output), a column-parallel
output (``up_proj``, ``shard(-1)``), a row-parallel input (``down_proj``) and the
attention's output, parameters (``DTensor`` shards); a ``.grad`` write must change the
gradients upstream of it exactly as in one process. Also: only traces that call backward
keep a graph; check mode (on here, tests/distributed/conftest.py) reports a gradient that
differs between the ranks; errors in or before a backward block cost one trace; the
codec's autograd functions against the same computation on whole tensors.
"""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from helpers import last_token_loss
from nnsight_dist.testing.ranks import run_ranks

PROMPTS = ["The Eiffel Tower is in the city of", "Hello world, how are you today"]
ENV = {"NNSIGHT_DIST_TIMEOUT": "60"}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within 1e-4 relative to each value and to the tensor's scale (float32 sums run in
    another order when a matmul is split over the ranks)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                               msg=lambda m: f"{what}: {m}")


def gradient_values(model, prompt: str) -> dict[str, torch.Tensor]:
    """Every named gradient of the suite, computed with ``model`` (a tiny 4-layer model)."""
    layers = model.model.layers
    v: dict[str, torch.Tensor] = {}

    with model.trace(prompt):                                          # reads, one per placement
        h0 = layers[0].output                                         # whole
        attn = layers[1].self_attn.output[0]                           # attention output
        up = layers[1].mlp.up_proj.output                              # colwise output: shard(-1)
        down_in = layers[1].mlp.down_proj.input                        # rowwise input: shard(-1)
        h1 = layers[1].output
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            v["layer_output"] = h1.grad.save()                         # reverse order of the forward
            v["rowwise_input"] = down_in.grad.save()
            v["colwise_output"] = up.grad.save()
            v["attention_output"] = attn.grad.save()
            v["upstream_layer_output"] = h0.grad.save()

    with model.trace(prompt):                                          # writes change what flows upstream
        up = layers[0].mlp.up_proj.output
        h0 = layers[0].output
        up1 = layers[1].mlp.up_proj.output
        h1 = layers[1].output
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            h1.grad = h1.grad * 3                                      # a whole gradient, replaced
            h1.grad[:, 0] = 0                                          # and edited in place
            up1.grad[..., :5] = 1e-3                                   # a colwise gradient, edited whole
            v["written_upstream"] = h0.grad.save()
            v["written_colwise"] = up.grad.save()

    with model.trace(prompt):                                          # two passes, retain_graph
        h2 = layers[2].output
        logits = model.lm_head.output
        first = last_token_loss(logits)
        second = logits[0, -2, 5]
        with first.backward(retain_graph=True):
            v["first_pass"] = h2.grad.save()
        with second.backward():
            v["second_pass"] = h2.grad.save()

    with model.trace(prompt):                                          # in-place edits, with grad on:
        layers[0].mlp.up_proj.output[..., :3] = 0                      # of a colwise output
        layers[0].mlp.down_proj.output[:, -1] = 0                      # of a rowwise output (a view)
        h1 = layers[1].output
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            v["after_inplace_edit"] = h1.grad.save()

    with model.trace() as tracer:                                     # batched invokes: their own rows
        with tracer.invoke(prompt):
            up = layers[1].mlp.up_proj.output
            loss = last_token_loss(model.lm_head.output)
            with loss.backward(retain_graph=True):
                v["invoke_colwise"] = up.grad.save()
        with tracer.invoke("Hello world"):
            h0 = layers[0].output
            loss = model.lm_head.output.sum()
            with loss.backward():
                v["invoke_layer_output"] = h0.grad.save()

    module = model._module
    module.zero_grad(set_to_none=True)
    with model.trace(prompt):                                          # parameters (shards at tp=2)
        up_w = layers[1].mlp.up_proj.weight                            # colwise: rows sharded
        down_w = layers[1].mlp.down_proj.weight                        # rowwise: columns sharded
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            v["rowwise_weight"] = down_w.grad.save()
            down_w.grad = down_w.grad * 2                              # what accumulates
            v["colwise_weight"] = up_w.grad.save()
    accumulated = module.model.layers[1].mlp.down_proj.weight.grad
    v["rowwise_weight_accumulated"] = _full(accumulated)
    module.zero_grad(set_to_none=True)
    return v


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _rank_values(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2)
    return gradient_values(model, PROMPTS[model.topology.dp_rank])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    model = nd.LanguageModel(path)
    return path, [gradient_values(model, prompt) for prompt in PROMPTS]


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp2_dp2"])
def test_gradients_match_one_process(reference, world):
    path, expected = reference
    results = run_ranks(_rank_values, world, path, timeout=240, env=ENV)
    for rank, values in enumerate(results):
        want = expected[rank // 2]                                     # rank // tp: its replica's prompt
        assert set(values) == set(want)
        for name, got in values.items():
            assert got.shape == want[name].shape, f"rank {rank} {name}"
            close(got, want[name], f"rank {rank} {name}")
        partner = results[rank ^ 1]                                    # the other rank of its tp group
        for name, got in values.items():
            assert torch.equal(got, partner[name]), f"{name} differs between the tp ranks of rank {rank}"
    # The writes did change the upstream gradients (compared with the plain read above).
    assert not torch.allclose(expected[0]["written_upstream"], expected[0]["upstream_layer_output"])
    assert not torch.allclose(expected[0]["after_inplace_edit"], expected[0]["layer_output"])  # edits took
    torch.testing.assert_close(expected[0]["rowwise_weight_accumulated"], expected[0]["rowwise_weight"] * 2)


def _grad_mode_seen(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2)
    seen = []
    handle = model._module.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_grad_enabled()))
    with model.trace(PROMPTS[0]):
        plain = model.model.layers[1].output.save()
    with model.trace(PROMPTS[0]):
        kept = model.model.layers[1].output.save()
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            pass
    handle.remove()
    return {"grad_enabled": seen, "requires_grad": [plain.requires_grad, kept.requires_grad]}


def test_only_traces_that_call_backward_keep_a_graph(reference):
    path, _ = reference
    for values in run_ranks(_grad_mode_seen, 2, path, timeout=120, env=ENV):
        assert values == {"grad_enabled": [False, True], "requires_grad": [False, True]}


def _rank_dependent_write(rank: int, path: str) -> None:
    model = nd.LanguageModel(path, tp=2)
    with model.trace(PROMPTS[0]):
        h0 = model.model.layers[0].output
        h1 = model.model.layers[1].output
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            h1.grad = h1.grad * (1 + model.topology.tp_rank)          # not allowed: depends on the rank
            h0.grad.save()


def test_check_mode_compares_gradients(reference):
    """A gradient served whole that differs between the tp ranks is reported by check mode."""
    path, _ = reference
    for result in run_ranks(_rank_dependent_write, 2, path, timeout=120, env=ENV, expect_errors=True):
        assert result[0] == "error" and result[1] == "DivergenceError", result
        assert "check mode: model.model.layers.0.output.grad was served as the whole value" in result[2]


# ---------------------------------------------------------------------------- the codec's gradients

def _codec_gradients(rank: int, placement: str) -> dict:
    """A fragment made by a toy engine from a replicated leaf ``x``, served whole through the
    codec, edited by a "body", cut back and continued by the engine (DTensor's own
    redistribution to a replicated value, as transformers' layers do); the loss uses both the
    engine's result and the body's whole value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from nnsight_dist.distributed import topology
    from nnsight_dist.distributed.failure import Failures
    from nnsight_dist.distributed.placement import LayoutCodec

    topo = topology.init(tp=2)
    codec = LayoutCodec(placement, topo.group("tp"), 2, topo.tp_rank, Failures(topo), "toy.output", False)
    mesh = init_device_mesh("cpu", (2,))
    a, c, x = _codec_data()
    x = x.clone().requires_grad_()
    # A column slice of a[0] * x (a shard), or a term of (a[0] + a[1]) * x (partial).
    local = (a[0] * x).chunk(2, dim=-1)[rank] if placement == "shard(-1)" else a[rank] * x
    whole = codec.whole(local)
    seen = []
    whole.register_hook(seen.append)                                   # the whole value's gradient
    edited = whole * 2
    fragment = codec.fragment(edited)
    layout = Shard(-1) if placement == "shard(-1)" else Partial()
    engine = DTensor.from_local(fragment, mesh, [layout], run_check=False).redistribute(mesh, [Replicate()])
    loss = (engine.to_local() * c).sum() + edited.sum() ** 2
    loss.backward()
    # x is replicated: each rank holds the part of its gradient that went through its fragment.
    return {"whole": whole.detach(), "whole_grad": seen[0], "x_grad": x.grad}


def _codec_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)


@pytest.mark.parametrize("placement", ["shard(-1)", "partial"])
def test_codec_gradients_are_whole(placement):
    """Against the same computation on whole tensors in one process."""
    a, c, x = _codec_data()
    x.requires_grad_()
    whole = a[0] * x if placement == "shard(-1)" else (a[0] + a[1]) * x
    whole.retain_grad()
    edited = whole * 2
    ((edited * c).sum() + edited.sum() ** 2).backward()
    results = run_ranks(_codec_gradients, 2, placement, timeout=120, env=ENV)
    for values in results:
        torch.testing.assert_close(values["whole"], whole.detach())
        torch.testing.assert_close(values["whole_grad"], whole.grad)
    torch.testing.assert_close(results[0]["x_grad"] + results[1]["x_grad"], x.grad)
    assert torch.equal(results[0]["whole_grad"], results[1]["whole_grad"])


def _errors_then_a_trace(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2)
    layers = model.model.layers
    errors = []
    for mistake in ("order", "shape", "one rank"):
        try:
            with model.trace(PROMPTS[0]):
                up = layers[0].mlp.up_proj.output
                h0 = layers[0].output
                h1 = layers[1].output
                loss = last_token_loss(model.lm_head.output)
                with loss.backward():
                    if mistake == "order":
                        h0.grad.save()
                        h1.grad.save()                                 # already passed
                    elif mistake == "shape":
                        h1.grad = torch.zeros(3)
                    else:
                        h1.grad.save()
                        if model.topology.tp_rank == 0:                # an error on one rank only,
                            raise ValueError("only on rank 0")         # with collectives still ahead
                        up.grad.save()
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
    return {"errors": errors, "after": _next_trace(model)}


def _next_trace(model) -> torch.Tensor:
    """The trace after a failed one: the gradient of layer 0's output."""
    with model.trace(PROMPTS[0]):
        h0 = model.model.layers[0].output
        loss = last_token_loss(model.lm_head.output)
        with loss.backward():
            after = h0.grad.save()
    return after


def test_errors_in_a_backward_block_cost_one_trace(reference):
    path, expected = reference
    results = run_ranks(_errors_then_a_trace, 2, path, timeout=120, env=ENV)
    for rank, values in enumerate(results):
        order, shape, one = values["errors"]
        assert order.startswith("OutOfOrderError: model.model.layers.1.output.grad was requested")
        assert shape.startswith("WriteShapeError: cannot write model.model.layers.1.output.grad")
        assert one == ("ValueError: only on rank 0" if rank == 0 else "RemoteError: rank 0 failed: ValueError: only on rank 0")
        close(values["after"], expected[0]["upstream_layer_output"], f"rank {rank}: the trace after")


def plain_backward(model) -> dict[str, torch.Tensor]:
    """``loss.backward()`` as a statement: torch's own backward; ``retain_grad()`` and
    ``.grad`` after it are plain PyTorch (a replicated parameter's gradient is whole)."""
    with model.trace(PROMPTS[0]):
        kept = model.model.layers[2].output
        kept.retain_grad()
        loss = last_token_loss(model.lm_head.output)
        loss.backward()
        grad = kept.grad.save()
        norm = model.model.norm.weight.grad.clone().save()
    model._module.zero_grad(set_to_none=True)
    return {"retained": grad, "norm_weight": norm}


def _plain_backward(rank: int, path: str) -> dict:
    return plain_backward(nd.LanguageModel(path, tp=2))


def test_plain_backward(reference):
    path, _ = reference
    model = nd.LanguageModel(path)
    expected = plain_backward(model)
    for values in run_ranks(_plain_backward, 2, path, timeout=120, env=ENV):
        for name, want in expected.items():
            close(values[name], want, name)


def _backward_in_a_helper(rank: int, path: str) -> None:
    model = nd.LanguageModel(path, tp=2)

    def helper(loss):
        loss.backward()

    with model.trace(PROMPTS[0]):
        helper(model.lm_head.output.sum())


def test_backward_called_outside_the_body_is_explained(reference):
    """The body's source does not show the call: the trace ran under no_grad."""
    path, _ = reference
    for result in run_ranks(_backward_in_a_helper, 2, path, timeout=120, env=ENV, expect_errors=True):
        assert result[0] == "error" and result[1] in ("NNsightError", "RemoteError"), result
        assert "does not call `.backward(` itself" in result[2] and "not in a function defined elsewhere" in result[2]


def _forward_error_on_one_rank(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2)
    layers = model.model.layers
    try:
        with model.trace(PROMPTS[0]):
            h0 = layers[0].output
            if model.topology.tp_rank == 0:
                raise ValueError("only on rank 0")                     # before the backward block
            h1 = layers[1].output
            loss = last_token_loss(model.lm_head.output)
            with loss.backward():
                h1.grad.save()
                h0.grad.save()
        error = "none"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "after": _next_trace(model)}


def test_a_rank_that_failed_before_the_backward_block(reference):
    """The other rank does not start its backward pass (its collectives would wait forever)."""
    path, expected = reference
    for rank, values in enumerate(run_ranks(_forward_error_on_one_rank, 2, path, timeout=120, env=ENV)):
        assert values["error"] == ("ValueError: only on rank 0" if rank == 0
                                   else "RemoteError: rank 0 failed: ValueError: only on rank 0")
        close(values["after"], expected[0]["upstream_layer_output"], f"rank {rank}: the trace after")
