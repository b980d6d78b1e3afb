"""Tests for nnsight_dist.intervention.inject (operations inside a function; offline, CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools
import importlib.util
import inspect
import json
import linecache
import subprocess
import sys
import traceback
from types import MethodType
from typing import Any, Callable

import pytest
import torch

from nnsight_dist.intervention.inject import _owner_class, call_through, format_operation, format_source, inject

# --------------------------------------------------------------------------------------
# Small hand-written functions
# --------------------------------------------------------------------------------------

_SCALE = 2


def tiny(x):
    y = torch.relu(x)
    return y.view(-1).sum() + abs(x).sum()


class _Obj:
    def __init__(self) -> None:
        self.layers = [lambda v: v + 1]
        self.values = [5]
        self.inner = self

    def proj(self, v):
        return v * 3

    def make(self):
        return lambda v: v - 1


def naming(self, x, fs):
    a = self.proj(x)
    b = torch.nn.functional.relu(torch.tensor([float(a)])).item()
    c = str(a).strip().upper()
    d = self.layers[0](x)
    e = self.make()(x)
    f = self.inner.values[0].__add__(1)
    g = fs[0](self.proj(x))
    h = abs(abs(-x))
    return a, b, c, d, e, f, g, h


def _recorder(log: list, wrap: Callable[[str, Any], Any] | None = None) -> Callable:
    def call(name, f, args, kwargs):
        log.append(name)
        out = f(*args, **kwargs)
        return wrap(name, out) if wrap is not None else out

    return call


def test_naming_rules_and_order() -> None:
    source, lines, fn = inject(naming, "naming")
    assert list(lines.items()) == [
        ("self_proj_0", 1),
        ("float_0", 2),
        ("torch_tensor_0", 2),
        ("torch_nn_functional_relu_0", 2),
        ("item_0", 2),  # attribute on a call result: only the attributes after it
        ("str_0", 3),
        ("strip_0", 3),
        ("upper_0", 3),
        ("unknown_0", 4),  # subscripted callee
        ("self_make_0", 5),
        ("unknown_1", 5),  # called call result
        ("__add___0", 6),  # attribute chain after a subscript
        ("self_proj_1", 7),  # callee first, then arguments, then the call
        ("unknown_2", 7),
        ("abs_0", 8),  # the inner call runs first and is numbered first
        ("abs_1", 8),
    ]
    assert source.splitlines()[0] == "def naming(self, x, fs):"
    obj, fs = _Obj(), [lambda v: v * 10]
    log: list[str] = []
    _, _, recorded = inject(naming, "naming", _recorder(log))
    assert recorded(obj, 2, fs) == naming(obj, 2, fs) == fn(obj, 2, fs)
    assert log == list(lines)  # straight-line code: execution order == naming order


def test_attribute_chain_on_subscript() -> None:
    def chain(obj):
        return obj.inner.values[0].__add__(1), obj.inner.inner.proj(2)

    _, lines, fn = inject(chain, "chain")
    assert list(lines) == ["__add___0", "obj_inner_inner_proj_0"]
    assert fn(_Obj()) == chain(_Obj())


def _side(log: list, tag: str, value: Any = None) -> Any:
    log.append(tag)
    return value


def evaluation_order(log, target):
    return _side(log, "callee", target)(
        _side(log, "a", 1), *_side(log, "star", [2]), k=_side(log, "k", 3), **_side(log, "kw", {"m": 4})
    )


def test_evaluation_order_and_arguments() -> None:
    def target(*args, **kwargs):
        return args, kwargs

    expected_log: list = []
    expected = evaluation_order(expected_log, target)
    calls: list = []

    def call(name, f, args, kwargs):
        calls.append((name, args, kwargs))
        return f(*args, **kwargs)

    _, lines, fn = inject(evaluation_order, "order", call)
    log: list = []
    assert fn(log, target) == expected == ((1, 2), {"k": 3, "m": 4})
    assert log == expected_log == ["callee", "a", "star", "k", "kw"]
    assert list(lines) == ["_side_0", "_side_1", "_side_2", "_side_3", "_side_4", "unknown_0"]
    assert calls[-1] == ("unknown_0", (1, 2), {"k": 3, "m": 4})


def test_duplicate_keywords_still_raise() -> None:
    def dup(kw):
        return dict(**kw, q=1)

    _, _, fn = inject(dup, "dup")
    assert fn({"a": 2}) == {"a": 2, "q": 1}
    with pytest.raises(TypeError, match="multiple values for keyword argument 'q'"):
        fn({"q": 2})
    with pytest.raises(TypeError):
        dup({"q": 2})


class _Base:
    def scale(self, x):
        return x * 2


def _double(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs) * 100

    return wrapper


class _Child(_Base):
    def __init__(self) -> None:
        self.__secret = 5

    @_double
    @_double
    def scale(self, x, factor=3, *rest, shift=1, **extra):
        return super().scale(x) * factor + shift + self.__secret + sum(rest) + len(extra) + _SCALE


def test_super_defaults_mangling_and_decorators() -> None:
    child = _Child()
    source, lines, fn = inject(child.scale, "child")
    assert source.splitlines()[0] == "def scale(self, x, factor=3, *rest, shift=1, **extra):"
    assert "@_double" not in source
    assert list(lines) == ["scale_0", "sum_0", "len_0"]  # super() itself is not an operation
    undecorated = inspect.unwrap(_Child.scale)
    assert inspect.signature(fn) == inspect.signature(undecorated)
    assert fn.__defaults__ == (3,) and fn.__kwdefaults__ == {"shift": 1}
    bound = MethodType(fn, child)
    for args, kwargs in [((1,), {}), ((1, 2, 3, 4), {"shift": 0, "z": 1})]:
        assert bound(*args, **kwargs) == undecorated(child, *args, **kwargs)
    assert child.scale(1) == undecorated(child, 1) * 10000  # decorators dropped when injected


def test_globals_are_live_and_unpolluted(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, fn = inject(_Child().scale, "child")
    assert fn.__globals__ is globals()
    assert not any("nnsight" in k or k.startswith("__nd") for k in globals())
    assert fn.__code__.co_freevars == ("__class__",)  # only the original closure
    child = _Child()
    before = fn(child, 1)
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 100)
    assert fn(child, 1) == before + 98


def _make_counter():
    count = 0
    offset = 10

    def bump(step=1):
        nonlocal count
        count += step
        return abs(count) + offset + len([abs(i) for i in range(step)]) + (lambda v: max(v, 0))(step)

    def read():
        return count

    return bump, read


def test_closures_comprehensions_lambdas() -> None:
    bump, read = _make_counter()
    log: list[str] = []
    _, lines, fn = inject(bump, "bump", _recorder(log))
    # Field order: a comprehension's element comes before its generators (as in nnsight).
    assert list(lines) == ["abs_0", "abs_1", "range_0", "len_0", "max_0", "unknown_0"]
    assert fn.__closure__ is not None
    assert fn(2) == 2 + 10 + 2 + 2
    assert read() == 2  # the original closure cell is shared
    assert bump(1) == 3 + 10 + 1 + 1
    assert fn(3) == 6 + 10 + 3 + 3
    assert log == ["abs_0", "range_0", "abs_1", "abs_1", "len_0", "unknown_0", "max_0"] + [
        "abs_0", "range_0", "abs_1", "abs_1", "abs_1", "len_0", "unknown_0", "max_0",
    ]


def frame_sensitive(x):
    y = abs(x)
    return sorted(locals()), eval("y + 1"), len(globals()) > 0


def test_frame_sensitive_builtins_run_in_the_frame() -> None:
    _, lines, fn = inject(frame_sensitive, "frame")
    assert list(lines) == ["abs_0", "sorted_0", "len_0"]
    assert fn(-3) == frame_sensitive(-3) == (["x", "y"], 4, True)


class _Outer:
    def __init__(self) -> None:
        self.__hidden = 7

    def method(self, x):
        def helper(y):
            return abs(y) + self.__hidden

        return helper(x)


def test_nested_function_in_method_keeps_name_mangling() -> None:
    outer = _Outer()
    _, lines, fn = inject(outer.method, "outer")
    assert list(lines) == ["abs_0", "helper_0"]
    assert fn(outer, -2) == outer.method(-2) == 9
    assert _owner_class("A.f.<locals>.B.g") == "B"
    assert _owner_class("A.f.<locals>.g") == "A"
    assert _owner_class("f.<locals>.g") is None
    assert _owner_class("f") is None


def test_reinjection_starts_from_the_original() -> None:
    _, lines1, fn1 = inject(naming, "naming", _recorder([]))
    log: list[str] = []
    _, lines2, fn2 = inject(fn1, "naming", _recorder(log))
    assert lines1 == lines2
    assert fn2(_Obj(), 2, [abs]) == naming(_Obj(), 2, [abs])
    assert log == list(lines2)


def test_rejects_lambdas_and_builtins() -> None:
    with pytest.raises(ValueError):
        inject(lambda v: v, "lam")
    with pytest.raises(TypeError):
        inject(len, "len")


def test_traceback_shows_source_lines() -> None:
    def boom(name, f, args, kwargs):
        if name == "abs_0":
            raise RuntimeError("boom")
        return f(*args, **kwargs)

    source, lines, fn = inject(tiny, "tiny.fn", boom)
    with pytest.raises(RuntimeError) as info:
        fn(torch.ones(2))
    frame = [f for f in traceback.extract_tb(info.value.__traceback__) if f.name == "tiny"][0]
    assert frame.filename == "<nnsight_dist.source tiny.fn>"
    assert frame.lineno == lines["abs_0"] + 1
    assert frame.line == source.splitlines()[lines["abs_0"]].strip()
    assert linecache.getline("<nnsight_dist.source tiny.fn>", 1).strip() == "def tiny(x):"


def test_format_source_and_operation() -> None:
    source, lines, _ = inject(tiny, "tiny")
    assert source == (
        "def tiny(x):\n"
        "    y = torch.relu(x)\n"
        "    return y.view(-1).sum() + abs(x).sum()\n"
    )
    assert lines == {"torch_relu_0": 1, "y_view_0": 2, "sum_0": 2, "abs_0": 2, "sum_1": 2}
    assert format_source(source, lines) == "\n".join(
        [
            "                  0 def tiny(x):",
            "  torch_relu_0 -> 1     y = torch.relu(x)",
            "  y_view_0     -> 2     return y.view(-1).sum() + abs(x).sum()",
            "  sum_0        -> +     ...",
            "  abs_0        -> +     ...",
            "  sum_1        -> +     ...",
        ]
    )
    assert format_operation("tiny.source.abs_0", source, lines["abs_0"], context=1) == "\n".join(
        [
            "tiny.source.abs_0:",
            "",
            "    1     y = torch.relu(x)",
            "--> 2     return y.view(-1).sum() + abs(x).sum()  <--",
        ]
    )
    assert format_operation("t.torch_relu_0", source, 1, context=0) == (
        "t.torch_relu_0:\n\n--> 1     y = torch.relu(x)  <--"
    )


# --------------------------------------------------------------------------------------
# Tiny transformers models
# --------------------------------------------------------------------------------------


def _build(arch: str, attn: str | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        cfg = cls(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        )
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(cfg, **kwargs).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


#: (arch, class): forwards whose operations are checked on the installed transformers.
CASES = [
    ("llama", "LlamaAttention"),
    ("llama", "LlamaMLP"),
    ("llama", "LlamaDecoderLayer"),
    ("gpt2", "GPT2Attention"),
    ("gpt2", "GPT2MLP"),
    ("gpt2", "GPT2Block"),
    ("qwen2", "Qwen2Attention"),
]


def _instances(model: torch.nn.Module, cls_name: str) -> list[tuple[str, torch.nn.Module]]:
    found = [(p, m) for p, m in model.named_modules() if type(m).__name__ == cls_name]
    assert len(found) == 2
    return found


# The reference names are nnsight 0.8.1's for the same installed forward, not a list written
# here: what a transformers forward calls changes between releases (5.24 renamed
# `past_key_values.update(...)` to `cache.update(...)`). nnsight numbers calls and assignments
# on one counter per name (`h = f(x)` is `f_0` then `h_0`); nd names calls only, so nnsight's
# own instrumenter (source parsing, decorator peeling, naming, order) runs with its assignment
# binding turned off. In a subprocess: importing nnsight mounts its `.save()` on every object,
# which would change what the rest of this session tests.
_REFERENCE_CALL_NAMES = r"""
import importlib, json, sys
source = importlib.import_module("nnsight.intervention.source")

class CallsOnly(source.Instrument):
    def bound(self, target, value, node):
        return value

source.Instrument = CallsOnly
names = {}
for qualname in sys.argv[1:]:
    module, _, cls = qualname.rpartition(".")
    forward = getattr(importlib.import_module(module), cls).forward
    names[qualname] = list(source.compile_source(source.decorator_chain(forward)[0]).names)
print(json.dumps(names))
"""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture(scope="module")
def reference_names() -> dict[str, list[str]]:
    """Qualified class name -> nnsight 0.8.1's operation names of its forward's calls."""
    if importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed")
    models = {arch: _build(arch) for arch in {arch for arch, _ in CASES}}
    classes = {_qualname(type(_instances(models[arch], cls_name)[0][1])) for arch, cls_name in CASES}
    run = subprocess.run([sys.executable, "-c", _REFERENCE_CALL_NAMES, *sorted(classes)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("arch,cls_name", CASES, ids=[c[1] for c in CASES])
def test_operation_names_match_the_reference(arch: str, cls_name: str, reference_names: dict[str, list[str]]) -> None:
    _, module = _instances(_build(arch), cls_name)[0]
    expected = reference_names[_qualname(type(module))]
    assert expected  # the reference found the forward's calls
    _, lines, _ = inject(module.forward, cls_name)
    assert list(lines) == expected


@pytest.mark.parametrize("arch,cls_name", CASES, ids=[c[1] for c in CASES])
def test_injected_forward_is_bit_identical(arch: str, cls_name: str) -> None:
    model = _build(arch)
    reference = _logits(model)
    logs: dict[str, list[str]] = {}
    for path, module in _instances(model, cls_name):
        logs[path] = []
        source, lines, fn = inject(module.forward, path, _recorder(logs[path]))
        assert source.startswith("def forward(")
        assert inspect.signature(fn) == inspect.signature(inspect.unwrap(type(module).forward))
        module.forward = MethodType(fn, module)
    assert torch.equal(_logits(model), reference)
    for log in logs.values():
        assert log and set(log) <= set(lines)
        first = list(dict.fromkeys(log))
        assert first == [name for name in lines if name in first]  # execution order == key order


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_call_keeps_decorated_forwards_identical(arch: str) -> None:
    """Forwards behind decorators/wrappers (dropped when injected) still give the same logits."""
    model = _build(arch)
    reference = _logits(model)
    wrapped = set()
    for _, module in model.named_modules():  # every module, torch.nn ones included
        if inspect.unwrap(type(module).forward) is not type(module).forward:
            wrapped.add(type(module).__name__)
        _, _, fn = inject(module.forward, type(module).__name__, call_through)
        module.forward = MethodType(fn, module)
    assert torch.equal(_logits(model), reference)
    # Which forwards the installed transformers decorates changes between releases (5.23:
    # @can_return_tuple, @merge_with_config_defaults + @capture_outputs, the checkpointing
    # wrapper); some must be, or dropping decorators was not exercised.
    assert wrapped


@pytest.mark.parametrize("arch,cls_name,child", [
    ("llama", "LlamaAttention", "o_proj"),
    ("llama", "LlamaAttention", "q_proj"),
    ("llama", "LlamaMLP", "down_proj"),
    ("gpt2", "GPT2Attention", "c_proj"),
    ("qwen2", "Qwen2Attention", "o_proj"),
])
def test_modifying_an_operation_matches_a_forward_hook(arch: str, cls_name: str, child: str) -> None:
    hooked = _build(arch)
    reference = _logits(hooked)
    path, module = _instances(hooked, cls_name)[0]
    handle = getattr(module, child).register_forward_hook(lambda m, i, out: out * 0)
    expected = _logits(hooked)
    handle.remove()
    assert not torch.equal(expected, reference)

    injected = _build(arch)
    path, module = _instances(injected, cls_name)[0]
    op = f"self_{child}_0"  # the forward's first call of the child, `self.<child>(...)`
    _, lines, fn = inject(module.forward, path, _recorder([], lambda name, out: out * 0 if name == op else out))
    assert op in lines
    module.forward = MethodType(fn, module)
    assert torch.equal(_logits(injected), expected)


def test_eager_attention_is_bit_identical() -> None:
    model = _build("llama", attn="eager")
    reference = _logits(model)
    callees: list[Callable] = []

    def call(name, f, args, kwargs):
        callees.append(f)
        return f(*args, **kwargs)

    for path, module in _instances(model, "LlamaAttention"):
        _, _, fn = inject(module.forward, path, call)
        module.forward = MethodType(fn, module)
    assert torch.equal(_logits(model), reference)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    assert callees.count(eager) == 2  # the attention itself ran as an operation, once per layer
