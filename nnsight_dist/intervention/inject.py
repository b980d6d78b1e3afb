"""Operations inside a function: the AST rewriting behind ``.source``.

An *operation* is one call expression in the body of a function, typically a module's
``forward``: ``self.q_proj(hidden_states)``, ``attn_output.reshape(...)``,
``torch.nn.functional.softmax(...)``. :func:`inject` recompiles the function so that every
operation goes through a caller-supplied ``call(name, f, args, kwargs)``, which receives
the operation's name, the callee and its evaluated arguments and returns the operation's
value. The caller can observe or replace inputs and outputs there; the default caller,
:func:`call_through`, just returns ``f(*args, **kwargs)`` and leaves behaviour unchanged.

Naming (nnsight's convention): the callee as a dotted name with ``.`` replaced by ``_``,
plus ``_<k>`` where ``k`` counts earlier operations with the same base name (0-based).
When the callee's attribute chain does not start at a plain name, only the attributes
after the non-name part are kept; a callee that is not an attribute or a name at all is
``unknown``.

==================================  =============================================
``self.q_proj(x)``                  ``self_q_proj_0``
``attention_interface(...)``        ``attention_interface_0``
``torch.nn.functional.softmax(x)``  ``torch_nn_functional_softmax_0``
``x.view(s).contiguous()``          ``x_view_0`` (inner), ``contiguous_0`` (outer)
``self.layers[0].mlp.fc(x)``        ``mlp_fc_0``
``self.layers[0](x)``, ``f()()``    ``unknown_0`` (and ``f_0`` for the inner call)
==================================  =============================================

Order (as in nnsight): a post-order walk of the syntax tree, children in field order, so
a call is numbered after the calls inside it: after those in its callee, then those in
its arguments from left to right. For ordinary straight-line code this is the order in
which the operations run (``self.q_proj(x).view(s)``: ``self_q_proj_0`` then ``view_0``;
``x.view(a).view(b)``: the inner call is ``view_0``); exceptions are comprehensions (the
element is numbered before the iterable) and assignments (target before value).
``line_numbers`` keeps this order, so its line indices need not increase when a call
spans several lines. Line indices count the ``def`` line as 0 (nnsight counts from the
line after it).

What is rewritten: every call in the function body, including calls inside nested
functions, lambdas, comprehensions and nested decorators/defaults (such operations may
run zero or many times per call). Not rewritten: calls inside annotations (never run),
the function's own decorators, defaults and annotations (not part of the body), and calls
to the frame-sensitive builtins ``super``, ``locals``, ``globals``, ``vars``, ``dir``,
``eval`` and ``exec`` by bare name, which must run in the function's own frame (so
zero-argument ``super()`` keeps working; ``super().forward(x)`` is still the operation
``forward_0``). Code that inspects its caller's frame in other ways
(``sys._getframe``) sees the ``call`` function instead.

Semantics kept: evaluation order (callee, then positional args, then keyword args),
starred and double-starred arguments (duplicate keywords still raise ``TypeError``),
closures (the new function shares the original closure cells), defaults and
keyword-only defaults, private-name mangling, ``__future__`` flags, and globals (the new
function runs on the original module's ``__globals__`` dict itself). ``call`` is neither
a global nor a closure variable: the generated code calls a placeholder constant that is
replaced by ``call`` in the compiled code objects, so nothing is added to the module and
``locals()`` inside the function shows only its own variables.

Decorators: the function is unwrapped to the innermost ``__wrapped__`` function and its
decorators are stripped. Decorator behaviour is *dropped* for injected functions: e.g.
transformers' ``@can_return_tuple``, ``@merge_with_config_defaults`` and
``@capture_outputs`` no longer apply, and ``GradientCheckpointingLayer`` subclasses lose
their gradient-checkpointing ``forward`` wrapper.

Tracebacks: the code is compiled under the file name ``<nnsight_dist.source {path}>``,
registered in :mod:`linecache` with the original source text, so tracebacks through an
injected function show its lines.
"""

from __future__ import annotations

import __future__
import ast
import inspect
import linecache
import types
import warnings
from collections import defaultdict
from typing import Any, Callable

__all__ = ["inject", "call_through", "format_source", "format_operation", "CallFn"]

#: ``call(name, f, args, kwargs) -> value`` of the operation.
CallFn = Callable[[str, Callable[..., Any], tuple, dict], Any]

# Placeholder constants in the generated code, swapped for `call` / `_merge_kwargs`.
_CALL = "\0nnsight_dist.call"
_KW = "\0nnsight_dist.merge_kwargs"
_FACTORY = "__nd_factory__"
_FRAME_SENSITIVE = frozenset({"super", "locals", "globals", "vars", "dir", "eval", "exec"})
_SKIPPED_FIELDS = frozenset({"annotation", "returns", "type_comment"})
_FUTURE_MASK = 0
for _feature in __future__.all_feature_names:
    _FUTURE_MASK |= getattr(__future__, _feature).compiler_flag


def call_through(name: str, f: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The default caller: run the operation unchanged."""
    return f(*args, **kwargs)


def _merge_kwargs(*parts: Any) -> dict:
    """Merge keyword groups and ``**`` mappings like a call does (duplicates raise)."""
    out: dict = {}
    for part in parts:
        if not hasattr(part, "keys"):
            raise TypeError(f"argument after ** must be a mapping, not {type(part).__name__}")
        for key in part.keys():
            if not isinstance(key, str):
                raise TypeError("keywords must be strings")
            if key in out:
                raise TypeError(f"got multiple values for keyword argument '{key}'")
            out[key] = part[key]
    return out


def _base_name(func: ast.expr) -> str:
    """The operation base name of a callee expression (see the module docstring)."""
    if isinstance(func, ast.Name):
        return func.id
    if not isinstance(func, ast.Attribute):
        return "unknown"
    parts: list[str] = []
    node: ast.expr = func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return "_".join(reversed(parts))


def _name_calls(node: ast.AST, counts: dict[str, int], line_numbers: dict[str, int]) -> None:
    """Name the calls under ``node``, post-order (inner calls first), as ``_nd_name``.

    Annotations are skipped (never run); frame-sensitive builtins are not named, but the
    calls in their arguments are.
    """
    for field, value in ast.iter_fields(node):
        if field in _SKIPPED_FIELDS:
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                _name_calls(child, counts, line_numbers)
    if isinstance(node, ast.Call) and not (
        isinstance(node.func, ast.Name) and node.func.id in _FRAME_SENSITIVE
    ):
        base = _base_name(node.func)
        name = f"{base}_{counts[base]}"
        counts[base] += 1
        node._nd_name = name  # type: ignore[attr-defined]
        line_numbers[name] = node.lineno - 1


class _Rewriter(ast.NodeTransformer):
    """Replaces each named call ``f(*a, **k)`` by ``CALL(name, f, (*a,), {**k})``.

    ``CALL`` is the placeholder constant later bound to ``call``; with a ``**`` argument
    the keywords become ``KW({named}, mapping, ...)`` so duplicates still raise.
    """

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        name = getattr(node, "_nd_name", None)
        if name is None:
            return node
        args = ast.Tuple(elts=node.args, ctx=ast.Load())
        if any(kw.arg is None for kw in node.keywords):
            # KW({named...}, mapping, {named...}, ...): groups in source order.
            parts: list[ast.expr] = []
            group: ast.Dict | None = None
            for kw in node.keywords:
                if kw.arg is None:
                    parts.append(kw.value)
                    group = None
                    continue
                if group is None:
                    group = ast.Dict(keys=[], values=[])
                    parts.append(group)
                group.keys.append(ast.Constant(kw.arg))
                group.values.append(kw.value)
            kwargs: ast.expr = ast.Call(ast.Constant(_KW), parts, [])
        else:
            kwargs = ast.Dict(
                keys=[ast.Constant(kw.arg) for kw in node.keywords],
                values=[kw.value for kw in node.keywords],
            )
        new = ast.Call(ast.Constant(_CALL), [ast.Constant(name), node.func, args, kwargs], [])
        # Synthetic nodes take the original call's position (tracebacks point at the call).
        return ast.fix_missing_locations(ast.copy_location(new, node))


def _parse_def(fn: types.FunctionType) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, list[str]]:
    """The ``def`` of ``fn`` (decorators removed, line 1 = the ``def`` line) and its raw lines."""
    text = inspect.getsource(fn)
    wrapped = text[:1] in (" ", "\t")
    tree = ast.parse("if 1:\n" + text if wrapped else text)
    node = tree.body[0].body[0] if wrapped else tree.body[0]  # type: ignore[attr-defined]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != fn.__code__.co_name:
        raise ValueError(f"cannot inject {fn.__qualname__}: only functions defined with 'def' are supported")
    node.decorator_list = []
    first = node.lineno - (2 if wrapped else 1)  # 0-based index of the def line in `text`
    ast.increment_lineno(node, -(node.lineno - 1))
    return node, text.splitlines()[first:]


def _dedent(lines: list[str]) -> str:
    """Strip the ``def`` line's indentation from every line that carries it."""
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    out = []
    for line in lines:
        if line.startswith(indent):
            line = line[len(indent):]
        out.append(line if line.strip() else "")
    return "\n".join(out) + "\n"


def _bind_placeholders(code: types.CodeType, values: dict[str, Any]) -> types.CodeType:
    """``code`` (and the code objects nested in it) with placeholder constants replaced."""
    consts = tuple(
        values[c] if type(c) is str and c in values
        else _bind_placeholders(c, values) if isinstance(c, types.CodeType)
        else c
        for c in code.co_consts
    )
    return code.replace(co_consts=consts)


def _owner_class(qualname: str) -> str | None:
    """The innermost class enclosing a function, from its qualname (``None`` if none).

    In ``A.f.<locals>.B.g`` a part followed by ``<locals>`` is a function, any other
    part but the last is a class: here ``B``; for ``A.f.<locals>.g`` it is ``A``.
    """
    parts = qualname.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] != "<locals>" and parts[i + 1] != "<locals>" and parts[i].isidentifier():
            return parts[i]
    return None


def inject(
    fn: Callable[..., Any], path: str, call: CallFn = call_through
) -> tuple[str, dict[str, int], Callable[..., Any]]:
    """Rewrite ``fn`` so that every call operation in its body goes through ``call``.

    ``fn`` is a function or a bound method (e.g. ``module.forward``); wrappers are followed
    down ``__wrapped__`` (:func:`inspect.unwrap`) and decorators are dropped. ``path`` only
    names the compiled code (``<nnsight_dist.source {path}>``). ``call(name, f, args,
    kwargs)`` must return the operation's value.

    Returns ``(source, line_numbers, new_fn)``: ``source`` is the dedented source of the
    function without decorators; ``line_numbers`` maps each operation name to the 0-based
    line in ``source`` where the call starts, in naming order (see the module docstring:
    post-order, as in nnsight); ``new_fn`` is a plain
    function with the signature of the unwrapped function (for a bound method the unbound
    function, taking ``self`` first; bind it with :class:`types.MethodType`). With the
    default ``call`` it behaves exactly like the unwrapped function.

    Raises ``TypeError`` if ``fn`` is not a Python function or method, ``OSError`` if its
    source is unavailable, ``ValueError`` if it is a lambda or uses the reserved names.
    """
    func = fn.__func__ if inspect.ismethod(fn) else fn
    func = inspect.unwrap(func)
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"cannot inject {fn!r}: not a Python function or method")
    node, raw_lines = _parse_def(func)
    if any(
        (isinstance(n, ast.Name) and n.id == _FACTORY) or (isinstance(n, ast.Constant) and n.value in (_CALL, _KW))
        for n in ast.walk(node)
    ):
        raise ValueError(f"cannot inject {func.__qualname__}: it uses a name or constant reserved by inject")

    counts: dict[str, int] = defaultdict(int)
    line_numbers: dict[str, int] = {}
    for stmt in node.body:
        _name_calls(stmt, counts, line_numbers)
    node.body = [_Rewriter().visit(stmt) for stmt in node.body]

    # def __nd_factory__(<free vars of fn>): <def fn>; return fn   (never run: the code
    # object of fn is taken from the compiled constants and given fn's own closure cells)
    # wrapped in `class <Owner>:` when fn is a method, so private names mangle as before.
    freevars = func.__code__.co_freevars
    factory_args = ast.arguments(
        posonlyargs=[], args=[ast.arg(n) for n in freevars], vararg=None,
        kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[],
    )
    factory = ast.FunctionDef(
        name=_FACTORY, args=factory_args, decorator_list=[], returns=None,
        body=[node, ast.Return(ast.Name(node.name, ast.Load()))],
    )
    outer: ast.stmt = factory
    owner = _owner_class(func.__qualname__)
    if owner is not None:
        outer = ast.ClassDef(name=owner, bases=[], keywords=[], body=[factory], decorator_list=[])
    module = ast.fix_missing_locations(ast.Module(body=[outer], type_ignores=[]))

    filename = f"<nnsight_dist.source {path}>"
    flags = func.__code__.co_flags & _FUTURE_MASK
    with warnings.catch_warnings():  # "'str' object is not callable" about the placeholders
        warnings.simplefilter("ignore", SyntaxWarning)
        code = compile(module, filename, "exec", flags=flags, dont_inherit=True)
    for step in ([owner] if owner else []) + [_FACTORY, node.name]:  # class body, factory, fn
        code = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == step)
    code = _bind_placeholders(code, {_CALL: call, _KW: _merge_kwargs})
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=func.__qualname__)

    cells = dict(zip(freevars, func.__closure__ or ()))
    closure = tuple(cells.get(n, types.CellType()) for n in code.co_freevars)
    new_fn = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, closure or None)
    new_fn.__kwdefaults__ = dict(func.__kwdefaults__) if func.__kwdefaults__ else None
    new_fn.__annotations__ = dict(func.__annotations__)
    new_fn.__dict__.update(func.__dict__)
    new_fn.__qualname__ = func.__qualname__
    new_fn.__module__ = func.__module__
    new_fn.__doc__ = func.__doc__
    new_fn.__wrapped__ = func  # re-injecting new_fn starts again from the original

    raw = "\n".join(raw_lines) + "\n"
    linecache.cache[filename] = (len(raw), None, raw.splitlines(keepends=True), filename)
    return _dedent(raw_lines), line_numbers, new_fn


def format_source(source: str, line_numbers: dict[str, int]) -> str:
    """A listing of ``source`` with each line's operations, an arrow and the line index.

    A line on which operations start reads ``"  <name> -> <index> <line>"`` (names padded
    to the longest one, indices right-aligned); further operations starting on the same
    line get a continuation row ``"  <name> -> + ..."`` (``...`` at the line's
    indentation); other lines show only the index, aligned. Trailing whitespace is stripped.
    """
    lines = source.splitlines()
    by_line: dict[int, list[str]] = defaultdict(list)
    for name, line in line_numbers.items():
        by_line[line].append(name)
    width = max((len(name) for name in line_numbers), default=0)
    digits = len(str(max(len(lines) - 1, 0)))
    rows = []
    for index, text in enumerate(lines):
        names = by_line.get(index, [])
        if not names:
            rows.append(f"  {'':<{width}}    {index:>{digits}} {text}".rstrip())
            continue
        rows.append(f"  {names[0]:<{width}} -> {index:>{digits}} {text}".rstrip())
        indent = text[: len(text) - len(text.lstrip())]
        rows.extend(f"  {name:<{width}} -> {'+':>{digits}} {indent}..." for name in names[1:])
    return "\n".join(rows)


def format_operation(name: str, source: str, line: int, context: int = 4) -> str:
    """``name`` (the operation's full name) then ``context`` lines around ``line`` of ``source``.

    The operation's line reads ``"--> <index> <line>  <--"``; the others ``"    <index> <line>"``
    (trailing whitespace stripped), indices right-aligned.
    """
    lines = source.splitlines()
    start, stop = max(0, line - context), min(len(lines), line + context + 1)
    digits = len(str(max(stop - 1, 0)))
    rows = [f"{name}:", ""]
    for index in range(start, stop):
        if index == line:
            rows.append(f"--> {index:>{digits}} {lines[index]}  <--")
        else:
            rows.append(f"    {index:>{digits}} {lines[index]}".rstrip())
    return "\n".join(rows)
