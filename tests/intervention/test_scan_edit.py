"""``model.scan`` (shapes without computation) and ``model.edit`` (default interventions)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from conftest import LONG, SAME_LEN, equal, pre_recorder, recorder

PROMPT = SAME_LEN[0]


def _ref_outputs(tiny, prompt, *modules):
    stores = [[] for _ in modules]
    tiny.logits(prompt, *[(m, "forward", recorder(s)) for m, s in zip(modules, stores)])
    return [s[0] for s in stores]


# ---------------------------------------------------------------------------- scan


def test_scan_shapes_without_compute(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    seen = []
    handle = tiny.model.lm_head._module.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with tiny.model.scan(PROMPT):
            layer_shape = L[0].output.shape
            value = L[1].output
            logits_shape = tiny.model.lm_head.output.shape
    finally:
        handle.remove()
    ref_layer, ref_logits = _ref_outputs(tiny, PROMPT, R[0], tiny.ref.lm_head)
    assert layer_shape == ref_layer.shape
    assert logits_shape == ref_logits.shape
    assert isinstance(value, FakeTensor)
    assert len(seen) == 1 and isinstance(seen[0], FakeTensor), "lm_head computed real values"
    assert not any(isinstance(p, FakeTensor) for p in tiny.model._module.parameters())


def test_scan_shapes_readable_after(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.scan(LONG):
        first_shape = L[0].output.shape  # noqa: F841
    proj = tiny.mlp_out(L[1])
    ref_mlp, ref_proj, ref_logits = _ref_outputs(tiny, LONG, R[1].mlp, tiny.mlp_out(R[1]), tiny.ref.lm_head)
    assert L[1].mlp.output.shape == ref_mlp.shape
    assert proj.output.shape == ref_proj.shape
    assert tiny.model.lm_head.output.shape == ref_logits.shape
    ref_in = []
    tiny.logits(LONG, (tiny.mlp_out(R[1]), "pre", pre_recorder(ref_in)))
    assert proj.input.shape == ref_in[0][0][0].shape
    # A later scan of another prompt updates the recorded shapes.
    with tiny.model.scan(SAME_LEN[1]):
        first_shape = L[0].output.shape  # noqa: F841
    (ref_mlp2,) = _ref_outputs(tiny, SAME_LEN[1], R[1].mlp)
    assert L[1].mlp.output.shape == ref_mlp2.shape != ref_mlp.shape


def test_trace_after_scan_is_real(llama):
    with llama.model.scan(PROMPT):
        shape = llama.model.lm_head.output.shape  # noqa: F841
    with llama.model.trace(PROMPT):
        logits = llama.model.lm_head.output.save()
    assert not isinstance(logits, FakeTensor)
    equal(logits, llama.logits(PROMPT))


# ---------------------------------------------------------------------------- edit


def _zero_hook(m, a, o):
    o[:] = 0


def test_edit_copy(tiny):
    R = tiny.layers(tiny.ref)
    with tiny.model.edit() as edited:
        tiny.layers(edited)[0].mlp.output[:] = 0
    with edited.trace(PROMPT):
        mlp = tiny.layers(edited)[0].mlp.output.save()
        logits = edited.lm_head.output.save()
    with tiny.model.trace(PROMPT):
        original = tiny.model.lm_head.output.save()
    assert mlp.abs().sum() == 0
    equal(logits, tiny.logits(PROMPT, (R[0].mlp, "forward", _zero_hook)))
    equal(original, tiny.logits(PROMPT))
    assert not torch.equal(logits, original)


def test_edit_inplace_and_clear(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    proj = tiny.mlp_out(L[1])
    with tiny.model.edit(inplace=True):
        proj.output = proj.output * 2
    with tiny.model.trace(PROMPT):
        seen = proj.output.save()  # the trace body sees the edited value
        edited = tiny.model.lm_head.output.save()
    tiny.model.clear_edits()
    with tiny.model.trace(PROMPT):
        plain = tiny.model.lm_head.output.save()

    ref_proj = []
    double = (tiny.mlp_out(R[1]), "forward", lambda m, a, o: o * 2)
    expected = tiny.logits(PROMPT, double, (tiny.mlp_out(R[1]), "forward", recorder(ref_proj)))
    equal(edited, expected)
    equal(seen, ref_proj[0])
    equal(plain, tiny.logits(PROMPT))


def test_edit_applies_to_every_trace_and_invoke(llama):
    L, R = llama.layers(), llama.layers(llama.ref)
    with llama.model.edit() as edited:
        llama.layers(edited)[2].output[:, -1] = 0
    for prompt in (PROMPT, LONG):
        with edited.trace(prompt):
            logits = edited.lm_head.output.save()

        def zero_last(m, a, o):
            o[:, -1] = 0

        equal(logits, llama.logits(prompt, (R[2], "forward", zero_last)))
    with edited.trace() as tracer:
        with tracer.invoke(LONG):
            a = edited.lm_head.output.save()
        with tracer.invoke(PROMPT):
            b = edited.lm_head.output.save()

    def zero_last_all(m, args, o):
        o[:, -1] = 0

    expected = llama.logits([LONG, PROMPT], (R[2], "forward", zero_last_all))
    equal(a, expected[0:1])
    equal(b, expected[1:2])
