"""Gradients inside a trace (``with loss.backward():``, ``.grad``), nnsight 0.8.1's forms.

Two independent references on the same tiny llama weights:

- plain PyTorch: the reference ``transformers`` model run with grad, layer outputs taken by
  forward hooks, gradients by ``torch.autograd.grad`` and gradient edits by tensor hooks
  (``register_hook``) that do what the trace's ``.grad`` writes do;
- nnsight 0.8.1 itself: the same scenario function run with both libraries (both capture
  the ``with`` bodies from this file), values, names, warnings and error types compared.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import nnsight_dist as nd
from helpers import last_token_loss
from conftest import SAME_LEN, close, equal, hooked, nnsight_pair

PROMPT = SAME_LEN[0]


@pytest.fixture(autouse=True)
def _no_parameter_grads(llama):
    """A backward pass accumulates into the parameters' ``.grad`` (as in nnsight and
    PyTorch): every test starts and leaves the shared models without any."""
    llama.model._module.zero_grad(set_to_none=True)
    llama.ref.zero_grad(set_to_none=True)
    yield
    llama.model._module.zero_grad(set_to_none=True)
    llama.ref.zero_grad(set_to_none=True)


def ref_run(tiny, prompts, layers, edits=None):
    """The reference forward with its graph: ``(logits, {layer: output})``; ``edits`` maps a
    layer to a tensor hook put on its output (a gradient edit)."""
    outs = {}

    def keep(i):
        def hook(module, args, output):
            outs[i] = output
            if edits and i in edits:
                output.register_hook(edits[i])

        return hook

    L = tiny.layers(tiny.ref)
    with hooked(*[(L[i], "forward", keep(i)) for i in layers]):
        logits = tiny.ref(**tiny.ref_inputs(prompts)).logits
    return logits, outs


# ---------------------------------------------------------------------------- against PyTorch


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def test_grads_of_each_architecture(tiny):
    """Every tiny architecture (gpt2 blocks return tuples: the gradient of an element)."""
    L = tiny.layers()
    with tiny.model.trace(PROMPT):
        h = _first(L[1].output)
        loss = last_token_loss(tiny.model.lm_head.output)
        with loss.backward():
            g = h.grad.save()
    outs = []
    with hooked((tiny.layers(tiny.ref)[1], "forward", lambda m, a, out: outs.append(_first(out)))):
        logits = tiny.ref(**tiny.ref_inputs(PROMPT)).logits
    close(g, torch.autograd.grad(last_token_loss(logits), outs[0])[0])
    tiny.model.zero_grad(set_to_none=True)


def test_grads_of_layer_outputs(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT) as tracer:
        h1 = L[1].output
        h3 = L[3].output
        loss = last_token_loss(llama.model.lm_head.output)
        with loss.backward():
            g3 = h3.grad.save()  # reverse order of the forward
            g1 = h1.grad.save()
    logits, outs = ref_run(llama, PROMPT, (1, 3))
    r3, r1 = torch.autograd.grad(last_token_loss(logits), [outs[3], outs[1]])
    close(g3, r3)
    close(g1, r1)
    assert tracer.calls_backward


def test_grad_write_changes_upstream_gradients(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT):
        h1 = L[1].output
        h3 = L[3].output
        loss = last_token_loss(llama.model.lm_head.output)
        with loss.backward():
            h3.grad = h3.grad * 3           # replace
            h3.grad[:, 0] = 0               # and edit in place
            g3 = h3.grad.save()
            g1 = h1.grad.save()

    def edit(g):
        g = g * 3
        g[:, 0] = 0
        return g

    logits, outs = ref_run(llama, PROMPT, (1, 3), edits={3: edit})
    r1 = torch.autograd.grad(last_token_loss(logits), outs[1])[0]
    logits, outs = ref_run(llama, PROMPT, (1,))
    unedited = torch.autograd.grad(last_token_loss(logits), outs[1])[0]
    close(g1, r1)
    assert g3[:, 0].abs().sum() == 0
    assert not torch.allclose(g1, unedited)  # the write did change the upstream gradient


def test_two_backward_passes_with_retain_graph(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT):
        h2 = L[2].output
        logits = llama.model.lm_head.output
        first = logits[0, -1].logsumexp(-1)
        second = logits[0, -2, 5]
        with first.backward(retain_graph=True):
            g_first = h2.grad.save()
        with second.backward():
            g_second = h2.grad.save()
    logits, outs = ref_run(llama, PROMPT, (2,))
    r_first = torch.autograd.grad(logits[0, -1].logsumexp(-1), outs[2], retain_graph=True)[0]
    r_second = torch.autograd.grad(logits[0, -2, 5], outs[2])[0]
    close(g_first, r_first)
    close(g_second, r_second)


def test_parameter_grad_inside_the_block(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT):
        w = llama.mlp_out(L[1]).weight
        loss = last_token_loss(llama.model.lm_head.output)
        with loss.backward():
            gw = w.grad.save()
    logits, _ = ref_run(llama, PROMPT, ())
    rw = torch.autograd.grad(last_token_loss(logits), llama.mlp_out(llama.layers(llama.ref)[1]).weight)[0]
    close(gw, rw)


def test_invokes_read_and_write_their_own_rows(llama):
    L = llama.layers()
    with llama.model.trace() as tracer:
        with tracer.invoke(SAME_LEN[0]):
            a1 = L[1].output
            a3 = L[3].output
            loss_a = last_token_loss(llama.model.lm_head.output)
            with loss_a.backward(retain_graph=True):
                a3.grad = a3.grad * 2
                ga = a1.grad.save()
        with tracer.invoke(SAME_LEN[1]):
            b1 = L[1].output
            loss_b = last_token_loss(llama.model.lm_head.output)
            with loss_b.backward():
                gb = b1.grad.save()
    logits, outs = ref_run(llama, list(SAME_LEN), (1, 3), edits={3: lambda g: torch.cat([g[:1] * 2, g[1:]])})
    ra = torch.autograd.grad(last_token_loss(logits, 0), outs[1], retain_graph=True)[0]
    logits, outs = ref_run(llama, list(SAME_LEN), (1,))
    rb = torch.autograd.grad(last_token_loss(logits, 1), outs[1])[0]
    assert ga.shape[0] == gb.shape[0] == 1
    close(ga, ra[:1])
    close(gb, rb[1:])


def test_plain_backward_and_retain_grad(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT):
        h = L[2].output
        h.retain_grad()
        loss = last_token_loss(llama.model.lm_head.output)
        loss.backward()
        g = h.grad.save()
        gw = llama.final_norm().weight.grad.clone().save()
    logits, outs = ref_run(llama, PROMPT, (2,))
    outs[2].retain_grad()
    last_token_loss(logits).backward()
    close(g, outs[2].grad)
    close(gw, llama.final_norm(llama.ref).weight.grad)


def test_the_backward_flag_is_known_before_the_model_runs(llama):
    seen = []
    handle = llama.model._module.register_forward_pre_hook(
        lambda module, args: seen.append(llama.model.interleaver.calls_backward))
    try:
        with llama.model.trace(PROMPT) as plain:
            llama.model.lm_head.output.save()
        with llama.model.trace(PROMPT) as grads:
            h = llama.layers()[1].output
            loss = llama.model.lm_head.output.sum()
            with loss.backward():
                h.grad.save()
    finally:
        handle.remove()
    assert (plain.calls_backward, grads.calls_backward) == (False, True)
    assert seen == [False, True]


def test_torch_is_left_as_it_was(llama):
    backward, grad = torch.Tensor.backward, torch.Tensor.__dict__.get("grad")
    with llama.model.trace(PROMPT):
        h = llama.layers()[1].output
        loss = llama.model.lm_head.output.sum()
        with loss.backward():
            h.grad.save()
    assert torch.Tensor.backward is backward and torch.Tensor.__dict__.get("grad") is grad
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    equal(x.grad, torch.full((2,), 3.0))


# ---------------------------------------------------------------------------- errors (nd alone)


def test_errors_keep_the_model_usable(llama):
    L = llama.layers()
    with pytest.raises(nd.OutOfOrderError) as err:
        with llama.model.trace(PROMPT):
            h1 = L[1].output
            h3 = L[3].output
            loss = llama.model.lm_head.output.sum()
            with loss.backward():
                h1.grad.save()
                h3.grad.save()  # already passed
    assert L[3].path + ".output.grad" in str(err.value)
    with pytest.raises(KeyError) as err:
        with llama.model.trace(PROMPT):
            h1 = L[1].output
            loss = llama.model.lm_head.output.sum()
            with loss.backward():
                h1.grad.save()
                raise KeyError("in the block")  # the raising line
    assert "the raising line" in str(err.traceback[-1].statement)
    test_grads_of_layer_outputs(llama)


# ---------------------------------------------------------------------------- side by side with nnsight 0.8.1

needs_nnsight = pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    """(nnsight model, nd model) on the same llama checkpoint."""
    theirs, ours = nnsight_pair(tiny_dirs["llama"])
    yield theirs, ours
    for model in (theirs, ours):
        model._module.zero_grad(set_to_none=True)


def read_and_write(model):
    with model.trace(PROMPT):
        h0 = model.model.layers[0].output
        h2 = model.model.layers[2].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward(retain_graph=True):
            g2 = h2.grad.save()
            h2.grad = h2.grad * 2
            g0 = h0.grad.save()
            unsaved = h0.grad
        n = unsaved.norm().save()
        with loss.backward():
            gl = loss.grad.save()
            again = h0.grad.save()
    return (g2, g0, n, again, gl), {k: k in locals() for k in ("g2", "unsaved", "again")}


def parameter(model):
    with model.trace(PROMPT):
        w = model.model.layers[1].mlp.down_proj.weight.save()
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            gw = w.grad.save()
            w.grad = torch.zeros_like(w.grad)
    accumulated = w.grad.clone()
    model.zero_grad(set_to_none=True)
    return gw, accumulated


def invokes(model):
    with model.trace() as tracer:
        with tracer.invoke(SAME_LEN[0]):
            a = model.model.layers[1].output
            loss = model.lm_head.output.sum()
            with loss.backward(retain_graph=True):
                ga = a.grad.save()
        with tracer.invoke(SAME_LEN[1]):
            b = model.model.layers[1].output
            loss = model.lm_head.output[0, -1].logsumexp(-1)
            with loss.backward():
                gb = b.grad.save()
    return ga, gb


def plain_backward(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.trace(PROMPT):
            h = model.model.layers[1].output
            kept = model.model.layers[2].output
            kept.retain_grad()
            loss = model.lm_head.output.sum()
            loss.backward()
            none = (h.grad is None).save()  # torch's warning: not a leaf, no retain_grad()
            g = kept.grad.save()
    return (none, g), sorted({(w.category.__name__, str(w.message)[:60]) for w in caught if "grad" in str(w.message)})


def stop_in_block(model):
    with model.trace(PROMPT) as tracer:
        h1 = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            g1 = h1.grad.save()
            tracer.stop()
        after = True
    return g1, {k: k in locals() for k in ("g1", "after")}


def catch_in_block(model):
    with model.trace(PROMPT):
        h0 = model.model.layers[0].output
        h1 = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            g0 = h0.grad.save()
            try:
                h1.grad  # passed: the error can be caught in the block
            except Exception as error:
                caught = type(error).__name__.save()
    return (g0, caught), {k: k in locals() for k in ("g0", "caught")}


def _block_in_a_helper(loss, h):
    with loss.backward():
        g = h.grad.save()
    return g


def helper(model):
    with model.trace(PROMPT) as tracer:
        h = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        g = _block_in_a_helper(loss, h).save()
    return g, tracer.calls_backward if hasattr(tracer, "calls_backward") else False


def earlier_first(model):
    with model.trace(PROMPT):
        h0 = model.model.layers[0].output
        h1 = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            h0.grad.save()
            h1.grad.save()


def slice_in_body(model):
    with model.trace(PROMPT):
        last = model.model.layers[1].output[:, -1]
        loss = model.lm_head.output.sum()
        with loss.backward():
            last.grad.save()


def forward_in_block(model):
    with model.trace(PROMPT):
        loss = model.lm_head.output.sum()
        with loss.backward():
            model.model.layers[1].output.save()


def no_grad_tensor(model):
    with model.trace(PROMPT):
        model.lm_head.output.save()
        with torch.ones(2).backward():
            pass


def under_generate(model):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False):
        loss = model.lm_head.output.sum()
        with loss.backward():
            pass


def graph_freed(model):
    with model.trace(PROMPT):
        h = model.model.layers[1].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            h.grad.save()
        with loss.backward():
            h.grad.save()


def grad_of_ids(model):
    with model.trace(PROMPT):
        ids = model.model.embed_tokens.input
        loss = model.lm_head.output.sum()
        with loss.backward():
            ids.grad.save()


@needs_nnsight
@pytest.mark.parametrize("scenario", [read_and_write, parameter, invokes, plain_backward, stop_in_block, catch_in_block, helper])
def test_values_as_nnsight(pair, scenario):
    theirs, ours = pair
    expected, got = scenario(theirs), scenario(ours)
    if scenario is plain_backward:
        assert got[1] == expected[1] and got[1], (got[1], expected[1])  # the same torch warning
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        if isinstance(a, torch.Tensor):
            equal(a, b)
        else:
            assert a == b


@needs_nnsight
@pytest.mark.parametrize("scenario, base", [
    (earlier_first, nd.OutOfOrderError),
    (slice_in_body, nd.OutOfOrderError),
    (forward_in_block, nd.OutOfOrderError),
    (no_grad_tensor, NotImplementedError),
    (under_generate, NotImplementedError),
    (graph_freed, RuntimeError),
    (grad_of_ids, RuntimeError),
])
def test_errors_as_nnsight(pair, scenario, base):
    """nnsight's error class (its own ``OutOfOrderError`` has ours as counterpart), then
    the same trace works again in both."""
    theirs, ours = pair
    with pytest.raises(Exception) as their_error:
        scenario(theirs)
    with pytest.raises(base) as our_error:
        scenario(ours)
    their_class = type(their_error.value)
    if base is nd.OutOfOrderError:
        assert their_class.__name__ == "OutOfOrderError"
    else:
        assert their_class is base or issubclass(their_class, base)
        assert isinstance(our_error.value, nd.NNsightError) or type(our_error.value) is their_class
    expected, got = read_and_write(theirs), read_and_write(ours)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        if isinstance(a, torch.Tensor):
            equal(a, b)


def test_a_block_that_asks_nothing_still_runs_the_pass(llama):
    with llama.model.trace(PROMPT):
        loss = last_token_loss(llama.model.lm_head.output)
        with loss.backward():
            pass
    logits, _ = ref_run(llama, PROMPT, ())
    last_token_loss(logits).backward()
    close(llama.model._module.lm_head.weight.grad, llama.ref.lm_head.weight.grad)


def test_gradient_through_an_ad_hoc_call(llama):
    """A logit lens in the loss: layer 2's gradient sums the model's path and the path
    through the modules called ad hoc on it."""
    L = llama.layers()
    with llama.model.trace(PROMPT):
        h2 = L[2].output
        lens = llama.model.lm_head(llama.model.model.norm(h2))
        loss = last_token_loss(llama.model.lm_head.output) + last_token_loss(lens)
        with loss.backward():
            g2 = h2.grad.save()
    logits, outs = ref_run(llama, PROMPT, (2,))
    ref_lens = llama.ref.lm_head(llama.final_norm(llama.ref)(outs[2]))
    r2 = torch.autograd.grad(last_token_loss(logits) + last_token_loss(ref_lens), outs[2])[0]
    close(g2, r2)
