"""``nd.NNsight`` on plain torch modules, the Envoy tree (rename, get, modules, print) and
``eproperty`` extensions (preprocess / transform)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import nnsight_dist as nd
from conftest import SAME_LEN, close, equal, hooked, recorder

PROMPT = SAME_LEN[0]


# ---------------------------------------------------------------------------- plain modules


@pytest.fixture
def seq():
    """An ``nd.NNsight`` of a small Sequential, and an untouched deep copy as reference."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    return nd.NNsight(net), ref


def test_sequential_reads(seq):
    model, ref = seq
    x = torch.randn(5, 4)
    with model.trace(x):
        hidden = model[0].output.save()
        relu_in = model[1].input.save()
        out = model.output.save()
    r0 = []
    with hooked((ref[0], "forward", recorder(r0))):
        expected = ref(x)
    equal(hidden, r0[0])
    equal(relu_in, r0[0])
    equal(out, expected)


def test_sequential_writes(seq):
    model, ref = seq
    x = torch.randn(5, 4)
    with model.trace(x):
        model[1].output = model[1].output * 2
        model[2].input[:, 0] = 1.5
        out = model.output.save()

    def set_first(m, args, kwargs):
        args[0][:, 0] = 1.5

    with hooked((ref[1], "forward", lambda m, a, o: o * 2), (ref[2], "pre", set_first)):
        expected = ref(x)
    equal(out, expected)
    assert not torch.equal(out, ref(x))


def test_sequential_two_invokes_concatenated(seq):
    model, ref = seq
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        with tracer.invoke(x1):
            h1 = model[0].output.save()
            o1 = model.output.save()
        with tracer.invoke(x2):
            model[0].output[:] = 0
            o2 = model.output.save()
    r0 = []
    with hooked((ref[0], "forward", recorder(r0))):
        both = ref(torch.cat([x1, x2]))
    equal(h1, r0[0][0:2])
    equal(o1, both[0:2])
    close(o1, ref(x1))
    zero = ref[2](ref[1](torch.zeros(3, 8)))
    equal(o2, zero)


# ---------------------------------------------------------------------------- tree


def test_rename_aliases(tiny_dirs, llama):
    model = nd.LanguageModel(tiny_dirs["llama"], rename={"model.layers": "layers", "self_attn": "attn"})
    R = llama.layers(llama.ref)
    with model.trace(PROMPT):
        attn = nd.save([])
        attn_path = nd.save([])
        for i in range(len(R)):
            attn.append(model.model.layers[i].attn.output[0])
            attn_path.append(model.model.layers[i].self_attn.output[0])
            if i == 0:
                via_alias = model.layers[0].output.save()
                via_path = model.model.layers[0].output.save()
    ref0, ref_attn = [], [[] for _ in R]
    llama.logits(PROMPT, (R[0], "forward", recorder(ref0)),
                 *[(r.self_attn, "forward", recorder(s)) for r, s in zip(R, ref_attn)])
    equal(via_alias, ref0[0])
    equal(via_path, ref0[0])
    assert model.layers[1].attn.path == "model.model.layers.1.self_attn"
    for i in range(len(R)):
        equal(attn[i], ref_attn[i][0][0])
        equal(attn_path[i], ref_attn[i][0][0])


def test_get(tiny):
    L = tiny.layers()
    rel = "transformer.h.0.mlp" if tiny.arch == "gpt2" else "model.layers.0.mlp"
    envoy = tiny.model.get(rel)
    assert envoy is L[0].mlp
    assert envoy.path == "model." + rel
    with tiny.model.trace(PROMPT):
        out = envoy.output.save()
    ref = []
    tiny.logits(PROMPT, (tiny.ref.get_submodule(rel), "forward", recorder(ref)))
    equal(out, ref[0])


def test_modules_and_named_modules(tiny):
    named = tiny.model.named_modules()
    expected = [f"model.{n}" if n else "model" for n, _ in tiny.ref.named_modules()]
    assert [p for p, _ in named] == expected
    assert [e.path for e in tiny.model.modules()] == expected
    for path, envoy in named:
        rel = path[len("model."):] if path != "model" else ""
        assert type(envoy._module) is type(tiny.ref.get_submodule(rel))


def test_print_shows_module_tree(tiny):
    text = str(tiny.model)
    expected = repr(tiny.ref)
    # transformers' Conv1D overrides __repr__ instead of extra_repr; like nnsight 0.8.1,
    # the envoy tree prints it as ``Conv1D()``.
    assert text == re.sub(r"Conv1D\([^)]*\)", "Conv1D()", expected)
    for name, module in tiny.ref.named_children():
        assert f"({name}): {type(module).__name__}" in text


# ---------------------------------------------------------------------------- eproperty


class HeadsEnvoy(nd.Envoy):
    """An envoy exposing an attention output projection as ``[B, heads, S, head_dim]``.

    ``heads`` hands out a *clone* (so the edit reaches the model only through the
    transform); ``heads_no_transform`` hands out a clone with no transform.
    """

    n_heads = 4

    @nd.eproperty(key="output")
    def heads(self): ...

    @heads.preprocess
    def heads(self, value):
        b, s, h = value.shape
        return value.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2).clone()

    @heads.transform
    @staticmethod
    def heads(value):
        return value.transpose(1, 2).reshape(value.shape[0], value.shape[2], -1)

    @nd.eproperty(key="output")
    def heads_no_transform(self): ...

    @heads_no_transform.preprocess
    def heads_no_transform(self, value):
        b, s, h = value.shape
        return value.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2).clone()


def _o_proj(tiny, m=None):
    layer = tiny.layers(m)[1]
    return layer.attn.c_proj if tiny.arch == "gpt2" else layer.self_attn.o_proj


def _zero_head_hook(n_heads):
    def hook(m, a, o):
        b, s, h = o.shape
        o.view(b, s, n_heads, h // n_heads)[:, -1, 2] = 0

    return hook


def test_eproperty_envoy_subclass(tiny):
    envoy = _o_proj(tiny)
    heads = HeadsEnvoy(envoy._module, envoy.interleaver, envoy.path)
    HeadsEnvoy.n_heads = tiny.ref.config.num_attention_heads
    with tiny.model.trace(PROMPT):
        view = heads.heads.clone().save()  # a repeated read gives the same view (nnsight)
        heads.heads[:, 2, -1] = 0
        logits = tiny.model.lm_head.output.save()
    ref = []
    expected = tiny.logits(PROMPT, (_o_proj(tiny, tiny.ref), "forward", _zero_head_hook(HeadsEnvoy.n_heads)))
    tiny.logits(PROMPT, (_o_proj(tiny, tiny.ref), "forward", recorder(ref)))
    b, s, h = ref[0].shape
    n = HeadsEnvoy.n_heads
    assert view.shape == (b, n, s, h // n)
    equal(view, ref[0].view(b, s, n, h // n).transpose(1, 2))
    equal(logits, expected)
    assert not torch.equal(logits, tiny.logits(PROMPT))


def test_eproperty_without_transform_does_not_write(llama):
    envoy = _o_proj(llama)
    heads = HeadsEnvoy(envoy._module, envoy.interleaver, envoy.path)
    HeadsEnvoy.n_heads = llama.ref.config.num_attention_heads
    with llama.model.trace(PROMPT):
        heads.heads_no_transform[:, 2, -1] = 0
        logits = llama.model.lm_head.output.save()
    equal(logits, llama.logits(PROMPT))


class Scaled:
    """Not an Envoy: any object with ``interleaver`` and ``path`` can host eproperties."""

    def __init__(self, envoy, factor):
        self.interleaver = envoy.interleaver
        self.path = envoy.path
        self.factor = factor

    @nd.eproperty(key="output")
    def scaled(self): ...

    @scaled.preprocess
    def scaled(self, value):
        return value * self.factor

    @scaled.postprocess
    def scaled(self, value):
        return value / self.factor


def test_eproperty_preprocess_postprocess_on_plain_object(llama):
    proj = llama.mlp_out(llama.layers()[1])
    host = Scaled(proj, 4.0)
    with llama.model.trace(PROMPT):
        seen = host.scaled.save()
        host.scaled = seen * 2  # postprocess divides by 4: the model gets 2x the original
        logits = llama.model.lm_head.output.save()
    ref = []
    ref_proj = llama.mlp_out(llama.layers(llama.ref)[1])
    expected = llama.logits(PROMPT, (ref_proj, "forward", recorder(ref)), (ref_proj, "forward", lambda m, a, o: o * 2))
    equal(seen, ref[0] * 4.0)
    close(logits, expected)
