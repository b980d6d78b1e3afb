"""``tracer.cache``: every visit of chosen modules, keyed by full path, equal to hooks."""

from __future__ import annotations

import pytest
import torch

from conftest import LONG, SAME_LEN, SHORT, equal, hooked, pre_recorder, recorder

PROMPT = SAME_LEN[0]


def _same(actual, expected) -> None:
    """Tensors equal at every leaf; non-tensor leaves only match in kind."""
    if isinstance(expected, torch.Tensor):
        equal(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _same(a, e)
    elif isinstance(expected, dict):
        assert set(actual.keys()) == set(expected.keys())
        for k in expected:
            _same(actual[k], expected[k])
    elif isinstance(expected, (int, float, bool, str, type(None))):
        assert actual == expected


def _record_all(tiny, prompts, inputs=False):
    """Output (and inputs) of every reference module, keyed by the nd full path."""
    outs, ins, hooks = {}, {}, []
    for name, module in tiny.ref.named_modules():
        path = f"model.{name}" if name else "model"
        hooks.append((module, "forward", recorder(outs.setdefault(path, []))))
        if inputs:
            hooks.append((module, "pre", pre_recorder(ins.setdefault(path, []))))
    with hooked(*hooks), torch.no_grad():
        tiny.ref(**tiny.ref_inputs(prompts))
    return {k: v for k, v in outs.items() if v}, {k: v for k, v in ins.items() if v}


def test_cache_everything(tiny):
    with tiny.model.trace(PROMPT) as tracer:
        cache = tracer.cache()
    outs, _ = _record_all(tiny, PROMPT)
    assert set(cache.keys()) == set(outs)
    for path, values in outs.items():
        assert len(values) == 1, path
        _same(cache[path].output, values[0])
        assert cache[path].inputs is None
    layer0 = "model.transformer.h.0" if tiny.arch == "gpt2" else "model.model.layers.0"
    assert layer0 in cache and f"{layer0}.mlp" in cache


def test_cache_chosen_modules_with_inputs(tiny):
    L = tiny.layers()
    proj = tiny.mlp_out(L[1])
    with tiny.model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[L[0].mlp, proj.path, tiny.model.lm_head], include_inputs=True)
    outs, ins = _record_all(tiny, PROMPT, inputs=True)
    assert set(cache.keys()) == {L[0].mlp.path, proj.path, "model.lm_head"}
    for path in cache.keys():
        equal(cache[path].output, outs[path][0])
        _same(cache[path].inputs, ins[path][0])
        equal(cache[path].input, ins[path][0][0][0])


def test_cache_inputs_only(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[L[1]], include_inputs=True, include_output=False)
    _, ins = _record_all(llama, PROMPT, inputs=True)
    assert cache["model.model.layers.1"].output is None
    _same(cache["model.model.layers.1"].inputs, ins["model.model.layers.1"][0])


def test_cache_attribute_access(tiny):
    L = tiny.layers()
    with tiny.model.trace(PROMPT) as tracer:
        cache = tracer.cache()
    outs, _ = _record_all(tiny, PROMPT)
    path = L[0].mlp.path
    by_attr = tiny.layers(cache.model)[0].mlp.output
    assert by_attr is cache[path].output
    equal(by_attr, outs[path][0])
    equal(cache.model.lm_head.output, outs["model.lm_head"][0])


def test_cache_dtype_and_detach(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT) as tracer:
        cache64 = tracer.cache(modules=[L[1]], dtype=torch.float64)
        attached = tracer.cache(modules=[L[1]], detach=False)
    outs, _ = _record_all(llama, PROMPT)
    value = cache64["model.model.layers.1"].output
    assert value.dtype == torch.float64 and not value.requires_grad
    equal(value, outs["model.model.layers.1"][0].double())
    assert attached["model.model.layers.1"].output.requires_grad == torch.is_grad_enabled()
    equal(attached["model.model.layers.1"].output.detach(), outs["model.model.layers.1"][0])


def test_cache_records_edited_values(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[L[0].mlp, L[1]])
        L[0].mlp.output[:, 1:] = 0
    path_mlp, path_layer = L[0].mlp.path, L[1].path

    def edit(m, a, o):
        o[:, 1:] = 0

    ref_mlp, ref_layer = [], []
    tiny.logits(PROMPT, (R[0].mlp, "forward", edit), (R[0].mlp, "forward", recorder(ref_mlp)),
                (R[1], "forward", recorder(ref_layer)))
    equal(cache[path_mlp].output, ref_mlp[0])
    assert cache[path_mlp].output[:, 1:].abs().sum() == 0
    equal(cache[path_layer].output, ref_layer[0])


def test_cache_in_one_invoke(tiny):
    L = tiny.layers()
    with tiny.model.trace() as tracer:
        with tracer.invoke(LONG):
            pass_through = L[0].output.save()
        with tracer.invoke(SHORT):
            cache = tracer.cache(modules=[L[1], tiny.model.lm_head])
    ref_layer, ref_logits = [], []
    tiny.logits([LONG, SHORT], (tiny.layers(tiny.ref)[1], "forward", recorder(ref_layer)),
                (tiny.ref.lm_head, "forward", recorder(ref_logits)))
    equal(cache[L[1].path].output, ref_layer[0][1:2])
    equal(cache["model.lm_head"].output, ref_logits[0][1:2])
    assert pass_through.shape[0] == 1


def test_cache_in_generate_one_value_per_step(tiny):
    with tiny.model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        cache = tracer.cache(modules=[tiny.model.lm_head, tiny.layers()[1]])
    steps, layer_steps = [], []
    tiny.ref_generate(PROMPT, (tiny.ref.lm_head, "forward", recorder(steps)),
                      (tiny.layers(tiny.ref)[1], "forward", recorder(layer_steps)),
                      max_new_tokens=3, do_sample=False)
    got = cache["model.lm_head"].output
    assert isinstance(got, list) and len(got) == len(steps) == 3
    for a, e in zip(got, steps):
        equal(a, e)
    layers = cache[tiny.layers()[1].path].output
    assert len(layers) == 3
    for a, e in zip(layers, layer_steps):
        equal(a, e)
    # One entry per step, by path and by attribute (nnsight 0.8.1: len(cache[path]) = steps).
    head = cache["model.lm_head"]
    assert len(head) == len(cache.model.lm_head) == 3
    for i, e in enumerate(steps):
        equal(head[i].output, e)
    with pytest.raises(IndexError):
        head[3]


def test_cache_is_kept_without_save(llama):
    """The cache returned by tracer.cache() is saved: it outlives the block by itself."""
    with llama.model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=["model.lm_head"])
    assert isinstance(cache, dict)
    equal(cache["model.lm_head"].output, llama.logits(PROMPT))
