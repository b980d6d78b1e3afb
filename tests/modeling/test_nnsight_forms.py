"""nnsight 0.8.1's forms in modeling, envoys and ``.source``, side by side with nnsight.

Each scenario is one function run once with nnsight 0.8.1 and once with nnsight_dist on the
same local weights: both libraries capture the ``with`` bodies from this file, so they run
literally the same intervention code, and the values must be equal. Bodies save with the
function form (``save(x)``: ``nd.save`` or ``nnsight.save``) because the two libraries'
``.save()`` methods collide in one process (see tests/test_nnsight_compat.py). ``.source``
operations are addressed by the same names in both.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import traceback
import warnings

import pytest
import torch
import transformers

import nnsight_dist as nd
from conftest import SAME_LEN, equal

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")
nnsight = None  # imported by the fixture, after nd has installed its `.save()` methods

PROMPT = SAME_LEN[0]


@pytest.fixture(scope="module")
def llama_path(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def tok(llama_path):
    return transformers.AutoTokenizer.from_pretrained(llama_path, padding_side="left")


@pytest.fixture(scope="module")
def pair(llama_path, tok):
    """(nnsight TransformersModel, nd TransformersModel) on the same llama checkpoint."""
    global nnsight
    ours = nd.TransformersModel(llama_path, task="text-generation", dispatch=True)
    nnsight = importlib.import_module("nnsight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nnsight.TransformersModel(llama_path, task="text-generation", tokenizer=tok, dispatch=True)
    return theirs, ours


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


# ---------------------------------------------------------------------------- 1. CONFIG


def test_config_fields_defaults_and_unknown_field(pair):
    from nnsight.schema import config as theirs

    from nnsight_dist import config as ours

    for mine, other in ((ours.AppConfig, theirs.AppConfig), (ours.ApiConfig, theirs.ApiConfig)):
        assert mine().model_dump() == other().model_dump()
        assert repr(mine()) == repr(other())
    assert set(nd.CONFIG.model_dump()) == set(nnsight.CONFIG.model_dump()) == {"API", "APP"}
    for section in ("APP", "API"):
        errors = []
        for config in (nnsight.CONFIG, nd.CONFIG):
            with pytest.raises(ValueError) as err:
                setattr(getattr(config, section), "NO_SUCH_FIELD", 1)
            errors.append(str(err.value))
        assert errors[0] == errors[1]
    with pytest.raises(ValueError):
        nd.CONFIG.NO_SUCH_SECTION = 1


def failing_body(model, save):
    with model.trace(PROMPT):
        h = model.model.layers[0].output
        bad = save(h[0, 0, 10_000])  # noqa: F841 - IndexError inside the body


def _frames(library, model, save, debug):
    """(the user's line is in the traceback, number of the library's frames in it)."""
    before = library.CONFIG.APP.DEBUG
    library.CONFIG.APP.DEBUG = debug
    try:
        with pytest.raises(IndexError) as err:
            failing_body(model, save)
    finally:
        library.CONFIG.APP.DEBUG = before
    root = os.path.dirname(library.__file__) + os.sep
    files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
    return any(f == __file__ for f in files), sum(f.startswith(root) for f in files)


def test_config_debug_shows_library_frames(pair):
    theirs, ours = pair
    t_user, t_quiet = _frames(nnsight, theirs, nnsight.save, False)
    _, t_debug = _frames(nnsight, theirs, nnsight.save, True)
    o_user, o_quiet = _frames(nd, ours, nd.save, False)
    _, o_debug = _frames(nd, ours, nd.save, True)
    assert t_user and o_user
    # Without DEBUG only the block's own re-raise frames are left (nnsight: 2, here 1).
    assert t_debug > t_quiet and o_debug > o_quiet and o_quiet <= t_quiet


# ---------------------------------------------------------------------------- 2. NNsight(envoys=)


def _envoy_classes(base, eproperty):
    """An Envoy subclass with nnsight 0.8.1-style eproperties: a doubled view of the
    output, and a head view whose in-place edits go back through ``transform``."""

    class Doubled(base):
        @eproperty(key="output")
        def doubled(self, value):
            return value * 2

    class Heads(base):
        n_heads = 4

        @eproperty(key="output")
        def heads(self, value):
            b, s, h = value.shape
            return value.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2).clone()

        @heads.transform
        def heads(self, value, raw):
            return value.transpose(1, 2).reshape(raw.shape)

    return Doubled, Heads


def _classes(library):
    if library == "nnsight":
        from nnsight.intervention.eproperty import eproperty

        return _envoy_classes(nnsight.Envoy, eproperty)
    return _envoy_classes(nd.Envoy, nd.eproperty)


class SubLinear(torch.nn.Linear):
    pass


def test_envoys_class_and_dict_matching(pair):
    for library, NNsight in (("nnsight", nnsight.NNsight), ("nd", nd.NNsight)):
        Doubled, Heads = _classes(library)
        every = NNsight(_net(), envoys=Doubled)
        assert [type(e) for e in every] == [Doubled] * 3, library
        assert type(every) is NNsight
        net = torch.nn.Sequential(SubLinear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        by_type = NNsight(net, envoys={torch.nn.Linear: Doubled, torch.nn.Module: Heads})
        # a key on the module's MRO, most derived first: SubLinear -> Linear; ReLU -> Module
        assert [type(e).__name__ for e in by_type] == ["Doubled", "Heads", "Doubled"], library
        by_path = NNsight(_net(), envoys={"2": Heads, "0": Doubled})
        assert [type(e).__name__ for e in by_path] == ["Doubled", "Envoy", "Heads"], library


def envoy_eproperties(model, layer, save):
    with model.trace(PROMPT):
        doubled = save(layer(model).self_attn.o_proj.doubled)
        plain = save(layer(model).self_attn.o_proj.output)
        model.model.layers[1].self_attn.o_proj.heads[:, 2, -1] = 0
        proj = save(model.model.layers[1].self_attn.o_proj.output.clone())  # sees the edit
        attn = save(model.model.layers[1].self_attn.output[0])
        o_proj = model.model.layers[2].self_attn.o_proj
        o_proj.heads[:, 1, -1] += o_proj.heads[:, 3, -1]  # two reads, one view
        logits = save(model.lm_head.output)
    return doubled, plain, proj, attn, logits


def test_envoys_custom_eproperties_in_a_trace(llama_path, tok, pair):
    results = []
    for library in ("nnsight", "nd"):
        Doubled, Heads = _classes(library)
        envoys = {"layers.0.self_attn.o_proj": Doubled, "layers.*.self_attn.o_proj": Heads}
        if library == "nnsight":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = nnsight.TransformersModel(llama_path, tokenizer=tok, task="text-generation",
                                                  dispatch=True, envoys=envoys)
            save = nnsight.save
        else:
            model, save = nd.LanguageModel(llama_path, envoys=envoys), nd.save
        assert type(model.model.layers[0].self_attn.o_proj) is Doubled
        assert type(model.model.layers[1].self_attn.o_proj) is Heads
        results.append(envoy_eproperties(model, lambda m: m.model.layers[0], save))
    (t_doubled, t_plain, t_proj, t_attn, t_logits), (o_doubled, o_plain, o_proj, o_attn, o_logits) = results
    equal(o_doubled, t_doubled)
    equal(o_doubled, o_plain * 2)
    equal(o_proj, t_proj)
    equal(o_attn, t_attn)
    assert o_proj.view(1, -1, 4, 32)[:, -1, 2].abs().sum() == 0
    equal(o_logits, t_logits)


def test_envoys_refuses_a_non_class():
    with pytest.raises(TypeError):
        nd.NNsight(_net(), envoys=5)


# ---------------------------------------------------------------------------- 3. .to() and friends


def test_module_methods_return_like_nnsight(pair):
    theirs, ours = pair
    for model in (theirs, ours):
        assert model.to("cpu") is model
        assert model.cpu() is model
        assert model.eval() is model._module  # not forwarded by nnsight: the torch module
        assert model.device == torch.device("cpu") and model.devices == {torch.device("cpu")}
    for NNsight in (nnsight.NNsight, nd.NNsight):
        wrapped = NNsight(_net())
        assert wrapped.to(torch.device("cpu")) is wrapped
        assert type(wrapped.train()) is torch.nn.Sequential


# ---------------------------------------------------------------------------- 4. loading keywords


def read_logits(model, save):
    with model.trace(PROMPT):
        logits = save(model.lm_head.output)
    return logits


@pytest.mark.parametrize("dispatch", [False, True])
def test_language_model_dispatch(llama_path, tok, pair, dispatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nnsight.LanguageModel(llama_path, tokenizer=tok, dispatch=dispatch)
    ours = nd.LanguageModel(llama_path, dispatch=dispatch, tokenizer_kwargs={"padding_side": "left"})
    assert ours.dispatched  # weights are loaded at construction whatever `dispatch` says
    assert theirs.dispatched == dispatch
    ours.dispatch()  # nnsight's explicit load: nothing left to do
    equal(read_logits(ours, nd.save), read_logits(theirs, nnsight.save))
    assert theirs.dispatched


def test_tokenizer_kwargs_and_refused_peft(llama_path):
    model = nd.LanguageModel(llama_path, tokenizer_kwargs={"padding_side": "right"})
    assert model.tokenizer.padding_side == "right"
    with pytest.raises(NotImplementedError, match="peft"):
        nd.LanguageModel(llama_path, peft="some/adapter")


# ---------------------------------------------------------------------------- 5. TransformersModel


def test_transformers_model_no_deprecation_and_same_values(llama_path, tok, pair):
    theirs, _ = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nnsight.LanguageModel(llama_path, tokenizer=tok, dispatch=True)
    assert any(issubclass(w.category, FutureWarning) for w in caught)  # nnsight deprecates it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = nd.TransformersModel(llama_path, task="text-generation", tp=1, pp=1)
        lm = nd.LanguageModel(llama_path)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert isinstance(lm, nd.TransformersModel)
    assert issubclass(nnsight.LanguageModel, nnsight.TransformersModel)
    assert ours.task == lm.task == theirs.task == "text-generation"
    equal(read_logits(ours, nd.save), read_logits(theirs, nnsight.save))
    equal(read_logits(lm, nd.save), read_logits(theirs, nnsight.save))


def test_transformers_model_refuses_other_tasks(llama_path, pair):
    from transformers.pipelines import check_task

    check_task("fill-mask")  # a task transformers knows, and nnsight would load
    with pytest.raises(NotImplementedError, match="fill-mask"):
        nd.TransformersModel(llama_path, task="fill-mask")
    with pytest.raises(KeyError) as ours:
        nd.TransformersModel(llama_path, task="no-such-task")
    with pytest.raises(KeyError) as theirs:  # nnsight: transformers' own KeyError
        nnsight.TransformersModel(llama_path, task="no-such-task", dispatch=True)
    assert str(ours.value) == str(theirs.value)


# ---------------------------------------------------------------------------- 6. generator


def generator_values(model, save):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        ids = save(model.generator.output)
        result = save(tracer.result)
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        first = save(model.generator.streamer.output)
    with model.generate([PROMPT, "Hi"], max_new_tokens=3, do_sample=False) as tracer:
        steps = save([])
        for step in tracer.iter[0:4]:
            steps.append(model.generator.streamer.output)
        batch = save(tracer.result)
    return ids, result, first, steps, batch


def test_generator_and_streamer_outputs(pair):
    theirs, ours = pair
    for model in (theirs, ours):
        with pytest.warns(FutureWarning, match="generator.output is deprecated"):
            values = generator_values(model, nd.save if model is ours else nnsight.save)
        if model is ours:
            o_ids, o_result, o_first, o_steps, o_batch = values
        else:
            t_ids, t_result, t_first, t_steps, t_batch = values
    equal(o_ids, t_ids)
    equal(o_result, o_ids)
    equal(o_first, t_first)  # the prompt's ids, put before the first step
    assert len(o_steps) == len(t_steps) == 4
    for a, b in zip(o_steps, t_steps):
        equal(a, b)
    equal(o_batch, t_batch)
    equal(torch.stack(o_steps[1:], -1), o_batch[:, -3:])  # each step's new token per row


# ---------------------------------------------------------------------------- 7. .source operations


def test_source_listings_are_nnsight_s(pair):
    theirs, ours = pair
    for path in ("model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0", "model"):
        t, o = theirs, ours
        for part in path.split("."):
            t, o = (t[int(part)], o[int(part)]) if part.isdigit() else (getattr(t, part), getattr(o, part))
        assert str(o.source) == str(t.source)
        names = [op.name for op in t.source]
        assert [op.name for op in o.source] == names
        for name in names:
            assert str(getattr(o.source, name)) == str(getattr(t.source, name))


def read_operations(model, save):
    attn = model.model.layers[0].self_attn
    with model.trace(PROMPT):
        shape = save(attn.source.input_shape_0.output)          # an assignment of a non-tensor
        query_in = save(attn.source.query_states_0.input)        # an assignment
        query = save(attn.source.query_states_0.output)
        rotary_in = save(attn.source.apply_rotary_pos_emb_0.input)
        o_in = save(attn.source.self_o_proj_0.inputs)            # a call
        o_out = save(attn.source.self_o_proj_0.output)
        bound = save(attn.source.attn_output_1.output)           # `attn_output = self.o_proj(...)`
        logits = save(model.lm_head.output)
    return shape, query, query_in, rotary_in, o_in[0][0], o_out, bound, logits


def edit_operations(model, save):
    attn = model.model.layers[0].self_attn
    with model.trace(PROMPT):
        attn.source.query_states_0.output = attn.source.query_states_0.output * 0.5
        rotary_in = save(attn.source.apply_rotary_pos_emb_0.input)
        attn.source.self_o_proj_0.output[:, -1] = 0
        bound = save(attn.source.attn_output_1.output)
        attn.source.attn_output_1.output = attn.source.attn_output_1.output + 1
        out = save(attn.output[0])
        logits = save(model.lm_head.output)
    return rotary_in, bound, out, logits


def test_operation_values_and_edits_equal_nnsight(pair):
    theirs, ours = pair
    t, o = read_operations(theirs, nnsight.save), read_operations(ours, nd.save)
    assert o[0] == t[0]
    for a, b in zip(o[1:], t[1:]):
        equal(a, b)
    equal(o[1], o[2])  # an assignment's input is the assigned value
    equal(o[5], o[6])
    edited_t, edited_o = edit_operations(theirs, nnsight.save), edit_operations(ours, nd.save)
    for a, b in zip(edited_o, edited_t):
        equal(a, b)
    equal(edited_o[0], o[3] * 0.5)  # the rebound value reached the next operation
    assert not torch.equal(edited_o[3], o[7])


def drill(model, save, outer, inner):
    attn = model.model.layers[0].self_attn
    with model.trace(PROMPT):
        source = getattr(attn.source, outer).source
        listing = save(str(source))
        deep = save(getattr(source, inner).output)
        out = save(getattr(attn.source, outer).output)
        logits = save(model.lm_head.output)
    return listing, deep, out, logits


def drill_and_edit(model, save, outer, inner):
    attn = model.model.layers[0].self_attn
    with model.trace(PROMPT):
        getattr(getattr(attn.source, outer).source, inner).output[:, -1] = 0
        logits = save(model.lm_head.output)
    return logits


def test_operation_source_values_and_edits(pair):
    theirs, ours = pair
    outer, inner = "attention_interface_1", "attn_output_transpose_0"
    t = drill(theirs, nnsight.save, outer, inner)
    o = drill(ours, nd.save, outer, inner)
    assert "def sdpa_attention_forward" in t[0] or "def eager_attention_forward" in t[0]
    assert o[0] == t[0]  # the drilled function's listing
    for a, b in zip(o[1:], t[1:]):
        equal(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)
    equal(o[2][0], o[1].contiguous())
    edited_t = drill_and_edit(theirs, nnsight.save, outer, inner)
    edited_o = drill_and_edit(ours, nd.save, outer, inner)
    equal(edited_o, edited_t)
    assert not torch.equal(edited_o, o[3])
    equal(read_logits(ours, nd.save), o[3])  # the drilled copy runs only in its own run


def test_operation_source_refusals(pair):
    _, ours = pair
    attn = ours.model.layers[0].self_attn
    with pytest.raises(nd.NotTracingError):
        attn.source.attention_interface_1.source  # noqa: B018
    with pytest.raises(nd.NNsightError, match="calls a module"):
        with ours.trace(PROMPT):
            attn.source.self_q_proj_0.source  # noqa: B018
    with pytest.raises(nd.NNsightError, match="an assignment"):
        with ours.trace(PROMPT):
            attn.source.attention_interface_0.source  # noqa: B018


# ---------------------------------------------------------------------------- 8. scan


def scan_broadcast_write(model, save, hidden):
    with model.scan(PROMPT):
        model.model.layers[0].mlp.output = torch.zeros(1, 1, hidden)
        mlp = save(model.model.layers[0].mlp.output.shape)
        layer = save(model.model.layers[0].output.shape)
        logits = save(model.lm_head.output.shape)
    return mlp, layer, logits


def scan_length_write(model, save, hidden):
    with model.scan(PROMPT):
        model.model.layers[0].output = torch.zeros(1, 3, hidden)
        later = save(model.lm_head.output.shape)  # noqa: F841


def test_scan_accepts_shape_changing_writes(pair):
    theirs, ours = pair
    hidden = ours.config.hidden_size
    t = scan_broadcast_write(theirs, nnsight.save, hidden)
    o = scan_broadcast_write(ours, nd.save, hidden)
    assert o == t and o[0] == (1, 1, hidden)
    # a length the model cannot combine: the model's own error, in both
    with pytest.raises(RuntimeError) as t_err:
        scan_length_write(theirs, nnsight.save, hidden)
    with pytest.raises(RuntimeError) as o_err:
        scan_length_write(ours, nd.save, hidden)
    assert str(o_err.value) == str(t_err.value)
    with pytest.raises(nd.WriteShapeError):  # real traces keep their check
        with ours.trace(PROMPT):
            ours.model.layers[0].mlp.output = torch.zeros(1, 1, hidden)
