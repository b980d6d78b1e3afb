"""nnsight 0.8.1's forms of capture and tracing, side by side with nnsight itself.

Each scenario is one function run once with ``nnsight.LanguageModel`` and once with
``nd.LanguageModel`` on the same local weights: both libraries capture the ``with`` bodies
from this file, so they execute literally the same code, ``.save()`` calls included (nd
rewrites them in the bodies it compiles; nnsight's run through the method nnsight mounts on
``object``, which nd's tensor ``save`` hands over to when no nd trace runs). Values,
names visible after the blocks, warnings and error types must be equal.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import pytest
import torch
import transformers

import nnsight_dist as nd
from conftest import SAME_LEN, equal, nnsight_pair

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")

PROMPT = SAME_LEN[0]
GEN = dict(max_new_tokens=3, do_sample=False)


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    """(nnsight model, nd model) on the same llama checkpoint."""
    return nnsight_pair(tiny_dirs["llama"])


def both(pair, scenario, *args):
    """``scenario(model, *args)`` with nnsight, then with nd: ``(theirs, ours)``."""
    theirs, ours = pair
    return scenario(theirs, *args), scenario(ours, *args)


def same(a, b):
    """Equal nests of tensors, lists, tuples, dicts and plain values."""
    if isinstance(a, torch.Tensor):
        equal(b.detach(), a.detach())
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for k in a:
            same(a[k], b[k])
    else:
        assert a == b, (a, b)


def visible(names, scope):
    """Which of ``names`` are bound in ``scope`` (a function's ``locals()``)."""
    return {n: n in scope for n in names}


# ---------------------------------------------------------------------------- 1. invoke scopes


def invokes_in_a_loop(model):
    rows = []
    with model.trace() as tracer:
        for i in range(3):
            with tracer.invoke(PROMPT):
                model.model.layers[0].output[:, i] = 0
                rows.append(model.model.layers[0].output[:, :4, :2].clone())
                last = i
    return rows, visible(["i", "last", "rows", "tracer"], locals())


def test_invokes_in_a_loop_see_the_loop_variable_at_their_entry(pair):
    theirs, ours = both(pair, invokes_in_a_loop)
    same(ours, theirs)
    rows = ours[0]
    for i, row in enumerate(rows):  # each invoke zeroed its own position, and only it
        assert row[0, i].abs().sum() == 0
        assert all(row[0, j].abs().sum() > 0 for j in range(3) if j != i)


def names_between_invokes(model):
    with model.trace() as tracer:
        k = 7
        with tracer.invoke(PROMPT):
            a = torch.tensor(k).save()
            k = 8
            shared = torch.tensor(100)
        with tracer.invoke(PROMPT):
            b = torch.tensor(k).save()  # k is in this invoke's snapshot: 7
            c = (shared + 1).save()     # not in its snapshot: bound by the other invoke
            model.lm_head.output
    return a, b, c, visible(["k", "shared", "a", "b", "c"], locals())


def test_names_set_before_and_between_invokes(pair):
    theirs, ours = both(pair, names_between_invokes)
    same(ours, theirs)


def barrier_patch(model):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT):
            h0 = model.model.layers[0].output[:, -1].clone()
            barrier()
        with tracer.invoke(SAME_LEN[1]):
            barrier()
            model.model.layers[2].output[:, -1] = h0
            patched = model.lm_head.output.save()
    return patched, visible(["h0", "patched", "barrier"], locals())


def test_barrier_between_invokes(pair):
    theirs, ours = both(pair, barrier_patch)
    same(ours, theirs)


def unsaved_rebinding(model):
    x = 100
    with model.trace(PROMPT):
        x = 5
        y = model.lm_head.output.save()
    return x, visible(["y"], locals())


def test_unsaved_rebinding_does_not_reach_the_caller(pair):
    theirs, ours = both(pair, unsaved_rebinding)
    same(ours, theirs)


# ---------------------------------------------------------------------------- 2. .save() on anything


class OwnSave:
    """A class with a ``save`` of its own: ``.save()`` calls it (in nnsight as in nd)."""

    def __init__(self):
        self.calls = 0

    def save(self):
        self.calls += 1
        return self


def save_anything(model):
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[model.lm_head]).save()
        empty = [].save()
        built = list().save()
        mapping = dict().save()
        number = (3).save()
        text = "abc".save()
        own = OwnSave().save()
        empty.append(model.model.layers[0].output[:, -1].clone())
        mapping["logits"] = model.lm_head.output.save()
    names = ["cache", "empty", "built", "mapping", "number", "text", "own"]
    return (empty, built, mapping, number, text, cache["model.lm_head"].output), visible(names, locals())


def test_save_on_any_object(pair):
    theirs, ours = both(pair, save_anything)
    same(ours, theirs)
    assert ours[1]["own"] is False  # its own save ran and did not mark it


def test_save_rewrite_keeps_the_users_line(pair):
    _, ours = pair
    with pytest.raises(AttributeError) as err:
        with ours.trace(PROMPT):
            h = ours.model.layers[0].output.save()
            ours.lm_head.output.nope.save()  # the failing line
    last = err.traceback[-1]
    assert last.path.name == "test_tracing_forms.py"
    assert "the failing line" in str(last.statement)


# ---------------------------------------------------------------------------- 3. multi-line headers


def multiline_headers(model):
    with model.trace(
        PROMPT,
    ) as tracer:
        a = model.lm_head.output.save()
        t1 = (tracer is not None).save()
    with model.trace() as tracer:
        with tracer.invoke(
            PROMPT
        ):
            b = model.lm_head.output.save()
    with model.generate(
        PROMPT,
        max_new_tokens=2,
        do_sample=False,
    ) as generator:
        c = generator.result.save()
    with model.trace() as tracer:
        with tracer.invoke(PROMPT) \
                as invoker:
            # a comment before the body's first statement
            d = model.lm_head.output.save()
            t2 = (invoker is not None).save()
    return a, b, c, d, t1, t2


def test_multiline_headers_keep_their_as_name(pair):
    theirs, ours = both(pair, multiline_headers)
    same(ours, theirs)


# ---------------------------------------------------------------------------- 4. errors


def no_input(model):
    with model.trace() as tracer:
        q = 1


def nested_invokes(model):
    with model.trace() as tracer:
        with tracer.invoke(PROMPT):
            with tracer.invoke(PROMPT):
                q = model.lm_head.output.save()


@pytest.mark.parametrize("scenario", [no_input, nested_invokes])
def test_setup_errors_are_value_errors(pair, scenario):
    theirs, ours = pair
    tracing = sys.gettrace()
    with pytest.raises(ValueError):
        scenario(theirs)
    with pytest.raises(nd.TraceSetupError) as err:
        scenario(ours)
    assert isinstance(err.value, ValueError) and isinstance(err.value, nd.NNsightError)
    assert not ours.interleaver.active and sys.gettrace() is tracing  # nothing left armed
    with ours.trace(PROMPT):  # and the model traces normally after
        ours.lm_head.output.save()


# ---------------------------------------------------------------------------- 5, 6. step loops


def kinds(caught):
    """The warnings that matter here, as (base category, gist)."""
    out = []
    for w in caught:
        msg = str(w.message)
        if "deprecated" in msg and "tracer.iter" in msg:
            out.append((issubclass(w.category, FutureWarning), "block form deprecated"))
        elif "never reached" in msg:
            out.append((w.category is UserWarning, "loop cut"))
    return out


def with_blocks(model, form):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.generate(PROMPT, **GEN) as tracer:
            steps = [].save()
            if form == "all":
                with tracer.all():
                    steps.append(model.lm_head.output[:, -1].argmax(-1))
            elif form == "range":
                with tracer.iter[1:3]:
                    steps.append(model.lm_head.output[:, -1])
            elif form == "one":
                with tracer.iter[1]:
                    steps.append(model.model.layers[1].output)
            else:
                with tracer.iter[0:5]:
                    steps.append(model.lm_head.output[:, -1])
            after = "ran".save()
    return steps, visible(["after"], locals()), kinds(caught)


@pytest.mark.parametrize("form", ["all", "range", "one", "beyond"])
def test_with_step_blocks(pair, form):
    theirs, ours = both(pair, with_blocks, form)
    same(ours, theirs)
    assert ours[1]["after"]


def loops_cut_short(model, form):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.generate(PROMPT, **GEN) as tracer:
            steps = [].save()
            seen = [].save()
            loop = tracer.all() if form == "all" else tracer.iter[0:5] if form == "beyond" else tracer.iter[5]
            for step in loop:
                seen.append(step)
                steps.append(model.lm_head.output[:, -1])
            after = "ran".save()
    return steps, seen, visible(["after"], locals()), kinds(caught)


@pytest.mark.parametrize("form", ["all", "beyond", "single"])
def test_loops_cut_short_warn_and_skip_what_follows(pair, form):
    theirs, ours = both(pair, loops_cut_short, form)
    same(ours, theirs)
    assert not ours[2]["after"] and ours[3] == [(True, "loop cut")]


def eos_stop(model, eos):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.generate(PROMPT, **GEN) as tracer:
            steps = [].save()
            for step in tracer.all():
                model.lm_head.output[:, -1, eos] = model.lm_head.output.abs().max() * 10
                steps.append(model.lm_head.output[:, -1])
            after = "ran".save()
    return steps, visible(["after"], locals()), kinds(caught)


def test_all_cut_by_eos(pair):
    theirs, ours = both(pair, eos_stop, pair[1].tokenizer.eos_token_id)
    same(ours, theirs)
    assert len(ours[0]) == 1


# ---------------------------------------------------------------------------- 7. session


def session(model):
    with model.session():
        with model.trace(PROMPT):
            hidden = model.model.layers[0].output
        between = hidden.clone().save()  # `hidden` left the first trace without a save
        with model.trace(PROMPT):
            model.model.layers[0].output = hidden * 2
            out = model.lm_head.output.save()
        plain = 3
        kept = [plain].save()
    return out, between, kept, visible(["hidden", "between", "plain", "kept", "out"], locals())


def test_session(pair):
    theirs, ours = both(pair, session)
    same(ours, theirs)
    with pair[1].trace(PROMPT):
        plain = pair[1].lm_head.output.save()
    assert not torch.equal(ours[0], plain)  # the second trace used the first one's value


# ---------------------------------------------------------------------------- 8. caches under generate


def generate_cache(model):
    with model.generate(PROMPT, **GEN) as tracer:
        cache = tracer.cache(modules=[model.lm_head, model.model.layers[0]], include_inputs=True)
    head, layer = cache["model.lm_head"], cache["model.model.layers.0"]
    return len(head), len(layer), len(layer.inputs), head.output, layer.input, sorted(cache.keys())


def test_cache_under_generate_has_one_entry_per_step(pair):
    theirs, ours = both(pair, generate_cache)
    same(ours, theirs)
    assert ours[0] == 3
