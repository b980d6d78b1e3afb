"""``model.trace``: reads, writes, skip, result, stop, ad-hoc calls, saving, prompt forms.

Each value is compared with the same checkpoint loaded separately by ``transformers`` and
driven with plain PyTorch hooks (see ``tests/conftest.py``).
"""

from __future__ import annotations

import runpy
import textwrap

import pytest
import torch

import nnsight_dist as nd
from conftest import LONG, SAME_LEN, close, equal, pre_recorder, recorder

PROMPT = SAME_LEN[0]


def _same_nest(actual, expected) -> None:
    """Tensors in ``actual`` equal those of ``expected``; other leaves only match in type."""
    if isinstance(expected, torch.Tensor):
        equal(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _same_nest(a, e)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected)
        for k in expected:
            _same_nest(actual[k], expected[k])
    elif isinstance(expected, (int, float, bool, str, type(None))):
        assert actual == expected
    else:  # caches and other objects: same kind of object
        assert type(actual) is type(expected)


# ---------------------------------------------------------------------------- reads


def test_output_reads(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        layer = L[1].output.save()
        mlp = tiny.mlp_out(L[2]).output.save()
        logits = tiny.model.lm_head.output.save()
    rl, rm, rh = [], [], []
    tiny.logits(PROMPT, (R[1], "forward", recorder(rl)), (tiny.mlp_out(R[2]), "forward", recorder(rm)),
                (tiny.ref.lm_head, "forward", recorder(rh)))
    equal(layer, rl[0])
    equal(mlp, rm[0])
    equal(logits, rh[0])


def test_inputs_and_input(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        args, kwargs = L[1].inputs
        args, kwargs = nd.save(args), nd.save(kwargs)
        first = L[1].input.save()
        proj_in = tiny.mlp_out(L[1]).input.save()
    ref_layer, ref_proj = [], []
    tiny.logits(PROMPT, (R[1], "pre", pre_recorder(ref_layer)), (tiny.mlp_out(R[1]), "pre", pre_recorder(ref_proj)))
    rargs, rkwargs = ref_layer[0]
    _same_nest(tuple(args), rargs)
    _same_nest(dict(kwargs), rkwargs)
    equal(first, rargs[0])
    equal(proj_in, ref_proj[0][0][0])


def test_save_tuple_output(tiny):
    attn = "attn" if tiny.arch == "gpt2" else "self_attn"
    with tiny.model.trace(PROMPT):
        out = getattr(tiny.layers()[0], attn).output.save()
    ref = []
    tiny.logits(PROMPT, (getattr(tiny.layers(tiny.ref)[0], attn), "forward", recorder(ref)))
    assert isinstance(out, tuple) and isinstance(ref[0], tuple)
    _same_nest(tuple(out), ref[0])


# ---------------------------------------------------------------------------- writes


def test_output_replace(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        L[1].output = L[1].output * 2
        tiny.mlp_out(L[2]).output = tiny.mlp_out(L[2]).output * 3
        logits = tiny.model.lm_head.output.save()
    expected = tiny.logits(PROMPT, (R[1], "forward", lambda m, a, o: o * 2),
                           (tiny.mlp_out(R[2]), "forward", lambda m, a, o: o * 3))
    equal(logits, expected)
    assert not torch.equal(logits, tiny.logits(PROMPT))


def test_inplace_edit(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        L[1].output[:, -1] = 0
        edited = L[1].output.save()
        logits = tiny.model.lm_head.output.save()

    def zero_last(m, a, o):
        o[:, -1] = 0

    seen = []
    expected = tiny.logits(PROMPT, (R[1], "forward", zero_last), (R[1], "forward", recorder(seen)))
    equal(edited, seen[0])
    assert edited[:, -1].abs().sum() == 0
    equal(logits, expected)
    assert not torch.equal(logits, tiny.logits(PROMPT))


def test_input_write(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        L[2].input = L[2].input * 0.5
        seen = L[2].input.save()
        logits = tiny.model.lm_head.output.save()

    def halve(m, args, kwargs):
        if args:
            return (args[0] * 0.5, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}

    ref_in = []
    expected = tiny.logits(PROMPT, (R[2], "pre", halve), (R[2], "pre", pre_recorder(ref_in)))
    equal(logits, expected)
    equal(seen, ref_in[0][0][0] if ref_in[0][0] else ref_in[0][1]["hidden_states"])
    assert not torch.equal(logits, tiny.logits(PROMPT))


def test_skip_layer(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    calls = []
    handle = L[1].mlp._module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with tiny.model.trace(PROMPT):
            L[1].skip(L[1].input)
            skipped = L[1].output.save()
            logits = tiny.model.lm_head.output.save()
    finally:
        handle.remove()
    assert calls == [], "the skipped layer's forward ran"

    layer_in = []
    ref = R[1]
    ref.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
    try:
        expected = tiny.logits(PROMPT, (ref, "pre", pre_recorder(layer_in)))
    finally:
        del ref.forward
    equal(logits, expected)
    equal(skipped, layer_in[0][0][0])
    assert not torch.equal(logits, tiny.logits(PROMPT))


# ---------------------------------------------------------------------------- result, stop


def test_result_and_model_output(tiny):
    with tiny.model.trace(PROMPT) as tracer:
        out = tiny.model.output.save()
        result = tracer.result.save()
    expected = tiny.logits(PROMPT)
    equal(out.logits, expected)
    equal(result.logits, expected)


def test_stop(llama):
    L, R = llama.layers(), llama.layers(llama.ref)
    calls = []
    handle = llama.model.lm_head._module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with llama.model.trace(PROMPT) as tracer:
            early = L[1].output.save()
            tracer.stop()
    finally:
        handle.remove()
    assert calls == [], "the model ran past tracer.stop()"
    ref = []
    expected = llama.logits(PROMPT, (R[1], "forward", recorder(ref)))
    equal(early, ref[0])
    with llama.model.trace(PROMPT):
        after = llama.model.lm_head.output.save()
    equal(after, expected)


def test_adhoc_module_call(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace(PROMPT):
        x = L[1].mlp.input.save()
        y = L[1].mlp(x * 2).save()
        real = L[1].mlp.output.save()
    with torch.no_grad():
        expected = R[1].mlp(x * 2)
    ref = []
    tiny.logits(PROMPT, (R[1].mlp, "forward", recorder(ref)))
    equal(y, expected)
    equal(real, ref[0])  # the ad-hoc call was not a visit of the module


# ---------------------------------------------------------------------------- saving


def test_saved_names_module_level(llama, tmp_path):
    script = tmp_path / "script_scope.py"
    script.write_text(textwrap.dedent("""\
        with model.trace(prompt):
            kept = model.model.layers[0].output.save()
            dropped = model.model.layers[1].output
            number = 3
        """))
    ns = runpy.run_path(str(script), init_globals={"model": llama.model, "prompt": PROMPT})
    assert "dropped" not in ns and "number" not in ns
    ref = []
    llama.logits(PROMPT, (llama.layers(llama.ref)[0], "forward", recorder(ref)))
    equal(ns["kept"], ref[0])


def test_saved_names_function_scope(llama):
    L = llama.layers()
    with llama.model.trace(PROMPT):
        kept = L[0].output.save()
        dropped = L[1].output
    with pytest.raises(NameError):
        dropped  # noqa: B018
    ref = []
    llama.logits(PROMPT, (llama.layers(llama.ref)[0], "forward", recorder(ref)))
    equal(kept, ref[0])

    def inner():
        with llama.model.trace(PROMPT):
            kept2 = L[0].output.save()
            dropped2 = L[1].output  # noqa: F841
        return kept2, "dropped2" in locals()

    kept2, leaked = inner()
    equal(kept2, ref[0])
    assert not leaked


def test_nd_save_list_and_dict(llama):
    L, R = llama.layers(), llama.layers(llama.ref)
    with llama.model.trace(PROMPT):
        outs = nd.save([])
        for layer in L:
            outs.append(layer.output)
        named = nd.save({})
        named["logits"] = llama.model.lm_head.output
    refs = [[] for _ in R]
    expected = llama.logits(PROMPT, *[(r, "forward", recorder(s)) for r, s in zip(R, refs)])
    assert len(outs) == len(R)
    for got, ref in zip(outs, refs):
        equal(got, ref[0])
    assert list(named) == ["logits"]
    equal(named["logits"], expected)


def test_traces_in_loop(llama):
    prompts = [SAME_LEN[0], LONG, SAME_LEN[1]]
    got = []
    for prompt in prompts:
        with llama.model.trace(prompt):
            logits = llama.model.lm_head.output.save()
        got.append(logits)
    for prompt, logits in zip(prompts, got):
        equal(logits, llama.logits(prompt))


# ---------------------------------------------------------------------------- prompt forms


def test_prompt_forms(tiny):
    enc = tiny.encode(PROMPT)
    ids = enc["input_ids"]
    expected = tiny.logits(PROMPT)
    forms = {
        "str": PROMPT,
        "list of str": [PROMPT],
        "token ids": ids[0].tolist(),
        "1-d tensor": ids[0],
        "2-d tensor": ids,
        "tokenizer output": enc,
        "plain dict": {"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]},
    }
    for name, prompt in forms.items():
        with tiny.model.trace(prompt):
            logits = tiny.model.lm_head.output.save()
        assert logits.shape == expected.shape, name
        assert torch.equal(logits, expected), name


def test_prompt_batch_of_strings(tiny):
    prompts = [LONG, SAME_LEN[0]]
    with tiny.model.trace(prompts):
        logits = tiny.model.lm_head.output.save()
    close(logits, tiny.logits(prompts))


# ---------------------------------------------------------------------------- known bugs

PASS_BODY = (
    "a with-body that is only `pass` or `...` leaks the internal SkipBody: CPython 3.11 "
    "compiles that statement to a NOP outside the with-block's exception-table range, so "
    "the SkipBody raised on its line event is not seen by __exit__"
)


def test_trace_with_pass_body(llama):
    calls = []
    handle = llama.model.lm_head._module.register_forward_hook(lambda m, a, o: calls.append(o.detach().clone()))
    try:
        with llama.model.trace(PROMPT):
            pass
    finally:
        handle.remove()
    assert len(calls) == 1
    equal(calls[0], llama.logits(PROMPT))


KEYWORD_INPUTS = (
    "inputs given as keyword arguments are not recognised as inputs: "
    "model.trace(input_ids=..., attention_mask=...) raises NNsightError('nothing to run') and "
    "tracer.invoke(input_ids=...) raises ValueError('max() arg is an empty sequence'); "
    "nnsight 0.8.1 accepts both"
)


def test_trace_keyword_inputs(llama):
    enc = llama.encode([LONG, PROMPT])
    with llama.model.trace(**enc):
        logits = llama.model.lm_head.output.save()
    equal(logits, llama.logits([LONG, PROMPT]))


def test_invoke_keyword_inputs(llama):
    ids = llama.encode(PROMPT)["input_ids"]
    with llama.model.trace() as tracer:
        with tracer.invoke(input_ids=ids):
            logits = llama.model.lm_head.output.save()
    equal(logits, llama.logits(PROMPT))
