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

from nnsight_dist.intervention.inject import (
    _owner_class, bind, call_through, evaluated, format_operation, format_source, inject,
)

# --------------------------------------------------------------------------------------
# The reference: nnsight 0.8.1's names, lines and listings for the same functions
# --------------------------------------------------------------------------------------

# nnsight's own instrumenter (source parsing, decorator peeling, naming, order, listing)
# run on the same functions, in a subprocess: importing nnsight mounts its `.save()` on
# every object, which would change what the rest of this session tests. Each function is
# an expression evaluated in a module's namespace ("module:expression").
_REFERENCE = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from nnsight.intervention import source as S

class Envoy:
    path = "m"

out = {}
for spec in sys.argv[2:]:
    module, _, expr = spec.partition(":")
    fn = eval(expr, vars(importlib.import_module(module)))
    _, compiled = S.instrument(fn, lambda *a, **k: None)
    listing = S.Source(Envoy(), "m", compiled)
    out[spec] = {
        "lines": [[name, compiled.lines[name]] for name in compiled.names],
        "listing": repr(listing),
        "operations": {name: repr(listing.node(name)) for name in compiled.names},
    }
print(json.dumps(out))
"""

_HERE = os.path.dirname(os.path.abspath(__file__))


def _reference(specs: list[str]) -> dict[str, dict]:
    if importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed")
    run = subprocess.run([sys.executable, "-c", _REFERENCE, _HERE, *specs],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _assert_like_nnsight(fn: Callable, reference: dict) -> None:
    """Our names, order, lines, listing and per-operation views equal nnsight's."""
    injected = inject(fn, "m")
    assert [list(item) for item in injected.lines.items()] == reference["lines"]
    assert format_source(injected.source, injected.lines) == reference["listing"]
    ours = {name: format_operation(f"m.source.{name}", injected.source, line) for name, line in injected.lines.items()}
    assert ours == reference["operations"]


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


def assignments(self, x, box):
    h = abs(x)
    h = h + 1
    a, b = h, abs(h)
    (c, d), e = (a, b), 3
    p, q = divmod(h, 2)
    first, *rest = [1, 2, 3]
    box[0] = h
    box[abs(0)] = b
    self.values[0] = e
    m = n = h
    h += 1
    k: int = h * 2
    t: int
    for i in range(2):
        k = k + i
    return h, a, b, c, d, e, p, q, first, rest, m, n, k


def _recorder(log: list, wrap: Callable[[str, Any], Any] | None = None) -> Callable:
    def call(name, f, args, kwargs):
        log.append(name)
        out = f(*args, **kwargs)
        return wrap(name, out) if wrap is not None else out

    return call


def test_naming_rules_and_order() -> None:
    injected = inject(naming, "naming")
    # The rules of the module docstring (nnsight's), checked literally; the comparison
    # with nnsight itself is test_hand_written_functions_match_nnsight.
    assert list(injected.lines) == [
        "self_proj_0", "a_0",
        "float_0", "torch_tensor_0", "torch_nn_functional_relu_0", "item_0", "b_0",
        "str_0", "strip_0", "upper_0", "c_0",
        "self_layers_0", "d_0",  # subscripts in the callee are skipped
        "self_make_0", "call_0", "e_0",  # a called call result
        "self_inner_values___add___0", "f_0",
        "self_proj_1", "fs_0", "g_0",  # callee first, then arguments, then the call
        "abs_0", "abs_1", "h_0",  # the inner call runs first and is numbered first
    ]
    assert injected.lines["self_proj_0"] == 2  # 1-based in the source, the def line is 1
    assert injected.source.splitlines()[0] == "def naming(self, x, fs):"
    obj, fs = _Obj(), [lambda v: v * 10]
    log: list[str] = []
    recorded = inject(naming, "naming", _recorder(log)).fn
    assert recorded(obj, 2, fs) == naming(obj, 2, fs) == injected.fn(obj, 2, fs)
    assert log == list(injected.lines)  # straight-line code: execution order == naming order


def test_assignment_operations_bind_what_call_returns() -> None:
    calls: list = []

    def call(name, f, args, kwargs):
        calls.append((name, f, args, kwargs))
        out = f(*args, **kwargs)
        return out * 10 if name == "h_0" else out

    obj = _Obj()
    injected = inject(assignments, "assign", call)
    names = list(injected.lines)
    # `a, b = h, abs(h)` names each element; starred, call-valued unpacking, chained and
    # augmented assignments and bare annotations are not operations.
    assert names == [
        "abs_0", "h_0", "h_1", "abs_1", "a_0", "b_0", "c_0", "d_0", "e_0", "divmod_0",
        "box_0", "abs_2", "box_1", "self_values_0", "k_0", "range_0", "k_1",
    ]
    box = [0, 0]
    result = injected.fn(obj, -3, box)
    # Binding `call`'s value for h_0 (abs(-3) * 10) is running the original with h = 30.
    expected_obj, expected_box = _Obj(), [0, 0]
    assert result == assignments(expected_obj, 30, expected_box)
    assert box == expected_box and obj.values == expected_obj.values
    h_op = next(c for c in calls if c[0] == "h_0")
    assert h_op[1] is bind and h_op[2] == (3,) and h_op[3] == {}
    # Run order differs from naming order where nnsight's does: the element binding `a`
    # runs before the call in the next element, a target's subscript after the value.
    assert [c[0] for c in calls] == [
        "abs_0", "h_0", "h_1", "a_0", "abs_1", "b_0", "c_0", "d_0", "e_0", "divmod_0",
        "box_0", "box_1", "abs_2", "self_values_0", "k_0", "range_0", "k_1", "k_1",
    ]


def test_frame_sensitive_builtins_run_in_the_frame() -> None:
    calls: list = []

    def call(name, f, args, kwargs):
        calls.append((name, f, args))
        return f(*args, **kwargs)

    injected = inject(frame_sensitive, "frame", call)
    assert list(injected.lines) == ["abs_0", "y_0", "locals_0", "sorted_0", "eval_0", "globals_0", "len_0"]
    assert injected.fn(-3) == frame_sensitive(-3) == (["x", "y"], 4, True)
    # their result, computed in the frame, is the operation's only argument
    assert [(n, a) for n, f, a in calls if f is evaluated][:2] == [("locals_0", ({"x": -3, "y": 3},)), ("eval_0", (4,))]


def test_hand_written_functions_match_nnsight() -> None:
    specs = {
        "test_inject:naming": naming,
        "test_inject:assignments": assignments,
        "test_inject:tiny": tiny,
        "test_inject:evaluation_order": evaluation_order,
        "test_inject:frame_sensitive": frame_sensitive,
        "test_inject:_Child.scale": _Child.scale,
        "test_inject:_Outer.method": _Outer.method,
        "test_inject:_make_counter()[0]": _make_counter()[0],
        "test_inject:_chain": _chain,
    }
    reference = _reference(list(specs))
    for spec, fn in specs.items():
        _assert_like_nnsight(fn, reference[spec])


def _chain(obj):
    return obj.inner.values[0].__add__(1), obj.inner.inner.proj(2)


def test_attribute_chain_on_subscript() -> None:
    injected = inject(_chain, "chain")
    assert list(injected.lines) == ["obj_inner_values___add___0", "obj_inner_inner_proj_0"]
    assert injected.fn(_Obj()) == _chain(_Obj())


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

    injected = inject(evaluation_order, "order", call)
    log: list = []
    assert injected.fn(log, target) == expected == ((1, 2), {"k": 3, "m": 4})
    assert log == expected_log == ["callee", "a", "star", "k", "kw"]
    assert list(injected.lines) == ["_side_0", "_side_1", "_side_2", "_side_3", "_side_4", "call_0"]
    assert calls[-1] == ("call_0", (1, 2), {"k": 3, "m": 4})


def test_duplicate_keywords_still_raise() -> None:
    def dup(kw):
        return dict(**kw, q=1)

    fn = inject(dup, "dup").fn
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
    source, lines, fn, _ = inject(child.scale, "child")
    # nnsight lists the decorator lines too; they are not part of the rewritten function
    assert source.splitlines()[:3] == ["@_double", "@_double", "def scale(self, x, factor=3, *rest, shift=1, **extra):"]
    assert list(lines) == ["scale_0", "sum_0", "len_0"]  # super() itself is not an operation
    undecorated = inspect.unwrap(_Child.scale)
    assert inspect.signature(fn) == inspect.signature(undecorated)
    assert fn.__defaults__ == (3,) and fn.__kwdefaults__ == {"shift": 1}
    bound = MethodType(fn, child)
    for args, kwargs in [((1,), {}), ((1, 2, 3, 4), {"shift": 0, "z": 1})]:
        assert bound(*args, **kwargs) == undecorated(child, *args, **kwargs)
    assert child.scale(1) == undecorated(child, 1) * 10000  # decorators dropped when injected


def _twice(f):
    def before(x):
        return x + 1

    @functools.wraps(f)
    def wrapper(self, x):
        return f(self, before(x)) * 2

    return wrapper


class _Dispatched:
    @_twice
    def run(self, x):
        return abs(x)


def test_a_decorator_calling_two_functions_is_not_peeled() -> None:
    """As nnsight: the wrapper is what is rewritten (its behaviour kept), the call of the
    decorated function one of its operations."""
    source, lines, fn, _ = inject(_Dispatched().run, "dispatched")
    assert source.splitlines()[1].strip() == "def wrapper(self, x):"
    assert list(lines) == ["before_0", "f_0"]
    assert fn(_Dispatched(), -3) == _Dispatched().run(-3) == 4
    _assert_like_nnsight(_Dispatched.run, _reference(["test_inject:_Dispatched.run"])["test_inject:_Dispatched.run"])


def test_globals_are_live_and_unpolluted(monkeypatch: pytest.MonkeyPatch) -> None:
    names = set(globals())
    fn = inject(_Child().scale, "child").fn
    assert fn.__globals__ is globals()
    assert set(globals()) == names
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
    _, lines, fn, _ = inject(bump, "bump", _recorder(log))
    # Field order: a comprehension's element comes before its generators (as in nnsight).
    assert list(lines) == ["abs_0", "abs_1", "range_0", "len_0", "max_0", "call_0"]
    assert fn.__closure__ is not None
    assert fn(2) == 2 + 10 + 2 + 2
    assert read() == 2  # the original closure cell is shared
    assert bump(1) == 3 + 10 + 1 + 1
    assert fn(3) == 6 + 10 + 3 + 3
    assert log == ["abs_0", "range_0", "abs_1", "abs_1", "len_0", "call_0", "max_0"] + [
        "abs_0", "range_0", "abs_1", "abs_1", "abs_1", "len_0", "call_0", "max_0",
    ]


def frame_sensitive(x):
    y = abs(x)
    return sorted(locals()), eval("y + 1"), len(globals()) > 0


class _Outer:
    def __init__(self) -> None:
        self.__hidden = 7

    def method(self, x):
        def helper(y):
            return abs(y) + self.__hidden

        return helper(x)


def test_nested_function_in_method_keeps_name_mangling() -> None:
    outer = _Outer()
    _, lines, fn, _ = inject(outer.method, "outer")
    assert list(lines) == ["abs_0", "helper_0"]
    assert fn(outer, -2) == outer.method(-2) == 9
    assert _owner_class("A.f.<locals>.B.g") == "B"
    assert _owner_class("A.f.<locals>.g") == "A"
    assert _owner_class("f.<locals>.g") is None
    assert _owner_class("f") is None


def test_reinjection_starts_from_the_original() -> None:
    _, lines1, fn1, _ = inject(naming, "naming", _recorder([]))
    log: list[str] = []
    _, lines2, fn2, _ = inject(fn1, "naming", _recorder(log))
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

    source, lines, fn, _ = inject(tiny, "tiny.fn", boom)
    with pytest.raises(RuntimeError) as info:
        fn(torch.ones(2))
    frame = [f for f in traceback.extract_tb(info.value.__traceback__) if f.name == "tiny"][0]
    assert frame.filename == "<nnsight_dist.source tiny.fn>"
    assert frame.lineno == lines["abs_0"]
    assert frame.line == source.splitlines()[lines["abs_0"] - 1].strip()
    assert linecache.getline("<nnsight_dist.source tiny.fn>", 1).strip() == "def tiny(x):"


def test_format_source_and_operation() -> None:
    """The formats themselves (their equality with nnsight's is checked on every function above)."""
    source, lines, _, _ = inject(tiny, "tiny")
    assert source == (
        "def tiny(x):\n"
        "    y = torch.relu(x)\n"
        "    return y.view(-1).sum() + abs(x).sum()\n"
    )
    assert lines == {"torch_relu_0": 2, "y_0": 2, "y_view_0": 3, "sum_0": 3, "abs_0": 3, "sum_1": 3}
    assert format_source(source, lines) == "\n".join(
        [
            "                  * def tiny(x):",
            " torch_relu_0 ->  0     y = torch.relu(x)",
            " y_0          ->  +     ...",
            " y_view_0     ->  1     return y.view(-1).sum() + abs(x).sum()",
            " sum_0        ->  +     ...",
            " abs_0        ->  +     ...",
            " sum_1        ->  +     ...",
            "                  2 ",
        ]
    )
    assert format_operation("tiny.source.abs_0", source, lines["abs_0"]) == "\n".join(
        [
            "tiny.source.abs_0:\n",
            "    def tiny(x):",
            "        y = torch.relu(x)",
            "    --> return y.view(-1).sum() + abs(x).sum() <--",
        ]
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
    ("llama", "LlamaRMSNorm"),
    ("llama", "LlamaRotaryEmbedding"),  # behind a decorator that calls two functions: not peeled
    ("llama", "LlamaModel"),
    ("llama", "LlamaForCausalLM"),
    ("gpt2", "GPT2Attention"),
    ("gpt2", "GPT2MLP"),
    ("gpt2", "GPT2Block"),
    ("gpt2", "GPT2Model"),
    ("qwen2", "Qwen2Attention"),
    ("qwen2", "Qwen2MLP"),
    ("qwen2", "Qwen2DecoderLayer"),
]


def _instances(model: torch.nn.Module, cls_name: str) -> list[tuple[str, torch.nn.Module]]:
    found = [(p, m) for p, m in model.named_modules() if type(m).__name__ == cls_name]
    assert found
    return found


def _spec(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}.forward"


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """nnsight 0.8.1's names, lines and listings of each case's installed forward.

    Not lists written here: what a transformers forward calls changes between releases
    (5.24 renamed `past_key_values.update(...)` to `cache.update(...)`).
    """
    models = {arch: _build(arch) for arch in {arch for arch, _ in CASES}}
    return _reference(sorted({_spec(type(_instances(models[arch], c)[0][1])) for arch, c in CASES}))


@pytest.mark.parametrize("arch,cls_name", CASES, ids=[c[1] for c in CASES])
def test_operations_and_listings_match_nnsight(arch: str, cls_name: str, reference: dict[str, dict]) -> None:
    _, module = _instances(_build(arch), cls_name)[0]
    expected = reference[_spec(type(module))]
    assert expected["lines"]  # the reference found the forward's operations
    _assert_like_nnsight(module.forward, expected)


@pytest.mark.parametrize("arch,cls_name", CASES, ids=[c[1] for c in CASES])
def test_injected_forward_is_bit_identical(arch: str, cls_name: str) -> None:
    model = _build(arch)
    reference = _logits(model)
    logs: dict[str, list[str]] = {}
    for path, module in _instances(model, cls_name):
        logs[path] = []
        _, lines, fn, _ = inject(module.forward, path, _recorder(logs[path]))
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
        fn = inject(module.forward, type(module).__name__, call_through).fn
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
    _, lines, fn, _ = inject(module.forward, path, _recorder([], lambda name, out: out * 0 if name == op else out))
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
        fn = inject(module.forward, path, call).fn
        module.forward = MethodType(fn, module)
    assert torch.equal(_logits(model), reference)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    assert callees.count(eager) == 2  # the attention itself ran as an operation, once per layer
