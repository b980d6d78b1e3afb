"""Errors: each raised where documented, with a useful message, and the model still works.

After every error the same model traces again and must give the reference's values;
values saved before the error are kept.
"""

from __future__ import annotations

import re
import traceback

import pytest
import torch

import nnsight_dist as nd
from conftest import LONG, SAME_LEN, SHORT, equal, recorder

PROMPT = SAME_LEN[0]


def _line_of(marker: str) -> int:
    """The line of this file holding ``marker`` (kept next to the statement it tags)."""
    with open(__file__) as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def _traces_normally(tiny) -> None:
    L = tiny.layers()
    with tiny.model.trace(PROMPT):
        h = L[1].output.save()
        logits = tiny.model.lm_head.output.save()
    ref = []
    expected = tiny.logits(PROMPT, (tiny.layers(tiny.ref)[1], "forward", recorder(ref)))
    equal(h, ref[0])
    equal(logits, expected)


def _ref_layer(tiny, i, prompt=PROMPT):
    ref = []
    tiny.logits(prompt, (tiny.layers(tiny.ref)[i], "forward", recorder(ref)))
    return ref[0]


def test_error_hierarchy():
    for cls in (nd.OutOfOrderError, nd.MissedProviderError, nd.DivergenceError, nd.RemoteError,
                nd.RouterTimeout, nd.UnshardableModel, nd.NotTracingError, nd.ModulePathError,
                nd.WriteShapeError):
        assert issubclass(cls, nd.NNsightError), cls
    assert issubclass(nd.NNsightError, Exception)


def test_out_of_order(tiny):
    L = tiny.layers()
    with pytest.raises(nd.OutOfOrderError) as err:
        with tiny.model.trace(PROMPT):
            later = L[2].output.save()
            earlier = L[0].output.save()  # noqa: F841
    assert L[0].path + ".output" in str(err.value)
    equal(later, _ref_layer(tiny, 2))
    _traces_normally(tiny)


def test_module_never_called():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    net = Net()
    model = nd.NNsight(net)
    x = torch.randn(2, 4)
    with pytest.raises(nd.MissedProviderError) as err:
        with model.trace(x):
            seen = model.used.output.save()
            model.unused.output.save()
    assert not isinstance(err.value, nd.OutOfOrderError)
    assert "model.unused.output" in str(err.value)
    equal(seen, net.used(x).detach())
    with model.trace(x):
        out = model.output.save()
    equal(out, net(x))


def test_iteration_beyond_generation_cuts_the_loop_with_a_warning(llama):
    """As nnsight 0.8.1: a step the run never makes cuts the loop (UserWarning), keeps
    what was saved, and skips the statements after the loop."""
    with pytest.warns(UserWarning, match="model.lm_head.output at iteration 5 was never reached"):
        with llama.model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
            first = llama.model.lm_head.output.save()
            for step in tracer.iter[5]:
                llama.model.lm_head.output.save()
            after = nd.save([])
    assert "after" not in dir()
    ref = []
    llama.ref_generate(PROMPT, (llama.ref.lm_head, "forward", recorder(ref)), max_new_tokens=3, do_sample=False)
    equal(first, ref[0])
    _traces_normally(llama)


def test_exception_in_body_keeps_type_line_and_saved_values(tiny):
    L = tiny.layers()
    with pytest.raises(ZeroDivisionError) as err:
        with tiny.model.trace(PROMPT):
            kept = L[1].output.save()
            1 / 0  # raises-in-body
    frames = traceback.extract_tb(err.value.__traceback__)
    assert any(f.filename == __file__ and f.lineno == _line_of("raises-in-body") for f in frames), frames
    equal(kept, _ref_layer(tiny, 1))
    _traces_normally(tiny)


def test_exception_in_invoke(llama):
    L = llama.layers()
    with pytest.raises(KeyError) as err:
        with llama.model.trace() as tracer:
            with tracer.invoke(LONG):
                kept = L[0].output.save()
            with tracer.invoke(SHORT):
                L[0].output.save()
                {}["missing"]  # raises-in-invoke
    frames = traceback.extract_tb(err.value.__traceback__)
    assert any(f.filename == __file__ and f.lineno == _line_of("raises-in-invoke") for f in frames), frames
    ref = []
    llama.logits([LONG, SHORT], (llama.layers(llama.ref)[0], "forward", recorder(ref)))
    equal(kept, ref[0][0:1])
    _traces_normally(llama)


def test_write_shape(tiny):
    L = tiny.layers()
    bad = torch.zeros(3)
    with pytest.raises(nd.WriteShapeError) as err:
        with tiny.model.trace(PROMPT):
            L[1].output = bad
    shape = tuple(_ref_layer(tiny, 1).shape)
    message = str(err.value)
    assert L[1].path + ".output" in message
    assert str(tuple(bad.shape)) in message and str(shape) in message
    _traces_normally(tiny)


def test_write_shape_in_invoke(llama):
    L = llama.layers()
    with pytest.raises(nd.WriteShapeError) as err:
        with llama.model.trace() as tracer:
            with tracer.invoke(LONG):
                L[1].output = torch.zeros(2, 3, 4)
            with tracer.invoke(SHORT):
                unused = 1  # noqa: F841
    rows = _ref_layer(llama, 1, [LONG, SHORT])[0:1]
    assert "(2, 3, 4)" in str(err.value) and str(tuple(rows.shape)) in str(err.value)
    _traces_normally(llama)


def test_unknown_module_path(tiny):
    layers = "h" if tiny.arch == "gpt2" else "layers"
    parent = tiny.model.transformer if tiny.arch == "gpt2" else tiny.model.model
    typo = layers[:-1] + "z" if len(layers) > 1 else "hh"
    with pytest.raises(nd.ModulePathError) as err:
        getattr(parent, typo)
    message = str(err.value)
    assert typo in message and re.search(rf"\b{layers}\b", message), message
    assert isinstance(err.value, AttributeError)
    with pytest.raises(nd.ModulePathError):
        tiny.model.get("model.layrs.0" if tiny.arch != "gpt2" else "transformer.hh.0")
    _traces_normally(tiny)


def test_not_tracing(tiny_dirs):
    fresh = nd.LanguageModel(tiny_dirs["llama"])
    with pytest.raises(nd.NotTracingError):
        fresh.lm_head.output
    with pytest.raises(nd.NotTracingError):
        fresh.model.layers[0].input
    with pytest.raises(nd.NotTracingError):
        fresh.lm_head.output = torch.zeros(1)
    with pytest.raises(nd.NotTracingError):
        nd.NNsight(torch.nn.Linear(2, 2)).output


def test_error_then_other_error_then_normal(llama):
    """Errors do not accumulate state: two different failures, then a clean run."""
    L = llama.layers()
    with pytest.raises(nd.OutOfOrderError):
        with llama.model.trace(PROMPT):
            L[1].output.save()
            L[0].output.save()
    with pytest.raises(RuntimeError):
        with llama.model.trace(PROMPT):
            L[0].output[:] = 0
            raise RuntimeError("user error")
    _traces_normally(llama)
