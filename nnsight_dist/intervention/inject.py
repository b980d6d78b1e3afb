"""Operations inside a function: the AST rewriting behind ``.source``.

An *operation* is one call expression or one assignment in the body of a function,
typically a module's ``forward``: ``self.q_proj(hidden_states)``,
``attn_output.reshape(...)``, ``attn_output = ...``. :func:`inject` recompiles the function
so that every operation goes through a caller-supplied ``call(name, f, args, kwargs)``,
which receives the operation's name, the callee and its evaluated arguments and returns
the operation's value. An assignment ``x = e`` runs as ``x = call("x_<k>", bind, (e,), {})``
(:func:`bind` is the identity), so the assigned value is the operation's only argument and
its value, and whatever ``call`` returns is what ``x`` is bound to. The caller can observe
or replace inputs and values there; the default caller, :func:`call_through`, just returns
``f(*args, **kwargs)`` and leaves behaviour unchanged.

Naming, order and listing are nnsight 0.8.1's (its ``Instrument``), so a name copied from
nnsight addresses the same operation here:

- a call is named after its callee's attribute chain joined with ``_``; subscripts in the
  chain are skipped (they say where in the object, not what it is called); when the chain
  does not start at a plain name only the attributes after the non-name part are kept, and
  a callee with no attribute at all is ``call``;
- an assignment ``target = value`` (or ``target: T = value``) is named after its target the
  same way; ``a, b = e1, e2`` (same length, no starred element) names each element, any
  other unpacking, chained ``a = b = v``, augmented assignment and a target with no name
  (``f()[0] = v``) are not operations;
- each name gets ``_<k>``, ``k`` counting earlier operations of the same name, calls and
  assignments on one counter (``h = relu(x)``: ``relu_0`` then ``h_0``;
  ``attention_interface = get(...)`` then ``attention_interface(...)``:
  ``attention_interface_0`` is the assignment, ``attention_interface_1`` the call).

==================================  =============================================
``self.q_proj(x)``                  ``self_q_proj_0``
``torch.nn.functional.softmax(x)``  ``torch_nn_functional_softmax_0``
``x.view(s).contiguous()``          ``x_view_0`` (inner), ``contiguous_0`` (outer)
``self.layers[0].mlp.fc(x)``        ``self_layers_mlp_fc_0``
``self.layers[0](x)``               ``self_layers_0``
``f()()``                           ``f_0`` (inner), ``call_0`` (outer)
``h = relu(x)``                     ``relu_0``, then ``h_0``
``self.cache[i] = v``               ``self_cache_0``
==================================  =============================================

Order: a post-order walk of the syntax tree, children in field order, so a call is
numbered after the operations inside it (callee, then arguments left to right); an
assignment visits its value, then its targets, then names itself. Calls in the function's
own parameter defaults and annotations and in nested ``def`` annotations are named too (as
nnsight does) but never rewritten: the function's defaults are the original function's,
and an annotation is never an operation that fires here. ``lines`` keeps the naming order;
its line numbers are 1-based in ``source``, which is the text of the function's code
object as :func:`inspect.getsourcelines` gives it (decorator lines included), dedented.

What is rewritten: every call and assignment in the function body, including those inside
nested functions, lambdas, comprehensions and nested decorators/defaults (such operations
may run zero or many times per call). Zero-argument ``super()`` is not an operation (it
reads the calling frame; ``super().forward(x)`` is still the operation ``forward_0``). The
other frame-sensitive builtins ``locals``, ``globals``, ``vars``, ``dir``, ``eval`` and
``exec``, called by bare name, keep their names but are evaluated in the function's own
frame and their *result* goes through ``call`` like an assigned value (nnsight would run
them inside its own dispatcher's frame): their ``.inputs`` are ``((result,), {})``. Code that
inspects its caller's frame in other ways (``sys._getframe``) sees the ``call`` function.

Semantics kept: evaluation order (callee, then positional args, then keyword args; an
assigned value before its targets; ``a, b = b, a`` still swaps), starred and
double-starred arguments (duplicate keywords still raise ``TypeError``), closures (the new
function shares the original closure cells), defaults and keyword-only defaults,
private-name mangling, ``__future__`` flags, and globals (the new function runs on the
original module's ``__globals__`` dict itself). With :func:`call_through` the result is
bit-identical. ``call`` is neither a global nor a closure variable: the generated code
calls a placeholder constant that is replaced by ``call`` in the compiled code objects, so
nothing is added to the module and ``locals()`` inside the function shows only its own
variables.

Decorators are peeled as nnsight peels them (so both list the same function): a wrapper
whose source calls exactly one of its free variables that holds a Python function is
replaced by that function, repeatedly. A wrapper that calls several (transformers'
``@dynamic_rope_update``) or none (a dispatcher) is itself the function rewritten, with its
closure, so its behaviour stays and the function it calls is an operation. The behaviour of
peeled decorators is *dropped* (nnsight rebuilds them around the rewritten function): e.g.
transformers' ``@can_return_tuple``, ``@merge_with_config_defaults`` and
``@capture_outputs`` no longer apply, and ``GradientCheckpointingLayer`` subclasses lose
their gradient-checkpointing ``forward`` wrapper.

Tracebacks: the code is compiled under the file name ``<nnsight_dist.source {path}>``,
registered in :mod:`linecache` with the original source text, so tracebacks through an
injected function show its lines (line 1 is the text's first line).

For placement under tensor parallelism :func:`inject` also reports which operations'
values are *exactly* the value of a call ``p.<attr>(...)`` of an attribute of the first
parameter ``p`` (``self``): the call itself, or an assignment whose whole value is such a
call (``x = self.q_proj(h)``). Only when ``p`` is never rebound anywhere in the function
(no assignment, deletion, nested parameter or ``global``/``nonlocal`` of that name) and
``p.<attr>`` is never assigned or deleted in it.
"""

from __future__ import annotations

import __future__
import ast
import copy
import inspect
import linecache
import textwrap
import types
import warnings
from typing import Any, Callable, NamedTuple

__all__ = ["inject", "call_through", "bind", "evaluated", "format_source", "format_operation", "CallFn", "Injected"]

#: ``call(name, f, args, kwargs) -> value`` of the operation.
CallFn = Callable[[str, Callable[..., Any], tuple, dict], Any]

# Placeholder constants in the generated code, swapped for `call` / `_merge_kwargs` /
# `bind` / `evaluated`.
_CALL = "\0nnsight_dist.call"
_KW = "\0nnsight_dist.merge_kwargs"
_BIND = "\0nnsight_dist.bind"
_EVALUATED = "\0nnsight_dist.evaluated"
_FACTORY = "__nd_factory__"
_FRAME_SENSITIVE = frozenset({"locals", "globals", "vars", "dir", "eval", "exec"})
_FUTURE_MASK = 0
for _feature in __future__.all_feature_names:
    _FUTURE_MASK |= getattr(__future__, _feature).compiler_flag


def call_through(name: str, f: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The default caller: run the operation unchanged."""
    return f(*args, **kwargs)


def bind(value: Any) -> Any:
    """The callee of an assignment operation (``x = e`` runs ``call(name, bind, (e,), {})``)."""
    return value


def evaluated(value: Any) -> Any:
    """The callee of a frame-sensitive builtin's operation: its result, computed in the frame."""
    return value


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


def _dotted(expr: ast.expr) -> tuple[list[str], bool]:
    """The attribute chain of ``expr`` (subscripts skipped) and whether a name roots it."""
    parts: list[str] = []
    while True:
        if isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Name):
            parts.append(expr.id)
            return parts[::-1], True
        else:
            return parts[::-1], False


class Injected(NamedTuple):
    """What :func:`inject` returns (see there)."""

    source: str
    lines: dict[str, int]
    fn: Callable[..., Any]
    #: op name -> ``(attr, is_call)`` for operations whose value is exactly that of a call
    #: ``p.<attr>(...)`` of the first parameter's attribute: the call (``is_call``) or an
    #: assignment of its whole value.
    attribute_calls: dict[str, tuple[str, bool]]


def _call_node(func: ast.expr, args: list[ast.expr], keywords: list[ast.keyword], name: str,
               at: ast.AST) -> ast.expr:
    """``CALL(name, func, (*args,), {**keywords})`` at the position of ``at``.

    With a ``**`` argument the keywords become ``KW({named}, mapping, ...)`` so duplicates
    still raise.
    """
    if any(kw.arg is None for kw in keywords):
        # KW({named...}, mapping, {named...}, ...): groups in source order.
        parts: list[ast.expr] = []
        group: ast.Dict | None = None
        for kw in keywords:
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
        kwargs = ast.Dict(keys=[ast.Constant(kw.arg) for kw in keywords], values=[kw.value for kw in keywords])
    new = ast.Call(ast.Constant(_CALL), [ast.Constant(name), func, ast.Tuple(args, ast.Load()), kwargs], [])
    # Synthetic nodes take the operation's position (tracebacks point at it).
    return ast.fix_missing_locations(ast.copy_location(new, at))


class _Instrument(ast.NodeTransformer):
    """Names and rewrites the operations of one ``def`` in nnsight 0.8.1's order.

    Mirrors nnsight's ``Instrument``: a call's children are visited before it is named; an
    assignment visits its value, then its targets, then names itself.
    """

    def __init__(self, receiver: str | None, reassigned: set[str]) -> None:
        self.counts: dict[str, int] = {}
        self.lines: dict[str, int] = {}
        self.attribute_calls: dict[str, tuple[str, bool]] = {}
        self.receiver = receiver
        self.reassigned = reassigned

    def _name(self, base: str, at: ast.AST) -> str:
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        name = f"{base}_{k}"
        self.lines[name] = at.lineno
        return name

    def _name_only(self, node: ast.AST) -> None:
        """Number the operations in ``node`` (an annotation) without rewriting it."""
        self.visit(copy.deepcopy(node))

    def visit_arg(self, node: ast.arg) -> ast.arg:
        if node.annotation is not None:
            self._name_only(node.annotation)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        returns, node.returns = node.returns, None  # visited last, like the field order
        self.generic_visit(node)
        node.returns = returns
        if returns is not None:
            self._name_only(returns)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def _attribute(self, func: ast.expr) -> str | None:
        """``attr`` when ``func`` is ``p.<attr>`` of the never-rebound first parameter ``p``."""
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == self.receiver
            and func.attr not in self.reassigned
        ):
            return func.attr
        return None

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not (node.args or node.keywords):
            return node  # reads __class__ and the first argument off the calling frame
        self.generic_visit(node)
        parts, _ = _dotted(node.func)
        name = self._name("_".join(parts) or "call", node)
        if isinstance(node.func, ast.Name) and node.func.id in _FRAME_SENSITIVE:
            # Evaluated here, in the function's frame; its result is the operation.
            return _call_node(ast.Constant(_EVALUATED), [node], [], name, node)
        new = _call_node(node.func, node.args, node.keywords, name, node)
        attr = self._attribute(node.func)
        if attr is not None:
            self.attribute_calls[name] = (attr, True)
            new._nd_attribute = attr  # type: ignore[attr-defined]
        return new

    def _bound(self, target: ast.expr, value: ast.expr, at: ast.AST) -> ast.expr:
        """``value`` routed through ``bind`` as the operation named after ``target``."""
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            elements = [*target.elts, *value.elts]
            if len(target.elts) == len(value.elts) and not any(isinstance(e, ast.Starred) for e in elements):
                value.elts = [self._bound(t, v, at) for t, v in zip(target.elts, value.elts)]
            return value
        parts, rooted = _dotted(target)
        if not rooted:
            return value
        name = self._name("_".join(parts), at)
        attr = getattr(value, "_nd_attribute", None)
        if attr is not None:
            self.attribute_calls[name] = (attr, False)
        return _call_node(ast.Constant(_BIND), [value], [], name, at)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        node.value = self.visit(node.value)  # the value runs before the targets
        node.targets = [self.visit(target) for target in node.targets]
        if len(node.targets) == 1:
            node.value = self._bound(node.targets[0], node.value, node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:  # nnsight visits neither the annotation nor the target
            node.value = self._bound(node.target, self.visit(node.value), node)
        return node


_REBINDS = {ast.ExceptHandler: "name", ast.FunctionDef: "name", ast.AsyncFunctionDef: "name",
             ast.ClassDef: "name", ast.alias: "asname", ast.MatchAs: "name", ast.MatchStar: "name",
             ast.MatchMapping: "rest"}
_SETS_ATTRIBUTES = frozenset({"setattr", "delattr", "__setattr__", "__delattr__", "add_module", "register_module"})


def _receiver(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str | None, set[str]]:
    """The first parameter's name if the function never rebinds it (assignment, deletion,
    nested parameter, ``global``/``nonlocal``, ``except ... as``, ``import ... as``, nested
    ``def``/``class``, pattern capture) and calls nothing that sets attributes by name
    (``setattr``, ``add_module``, ...), else ``None``; and the attributes of it that the
    function assigns or deletes."""
    params = [*node.args.posonlyargs, *node.args.args]
    if not params:
        return None, set()
    first = params[0].arg
    reassigned: set[str] = set()
    for n in ast.walk(node):
        rebinds = (
            (isinstance(n, ast.Name) and n.id == first and not isinstance(n.ctx, ast.Load))
            or (isinstance(n, ast.arg) and n.arg == first and n is not params[0])
            or (isinstance(n, (ast.Global, ast.Nonlocal)) and first in n.names)
            or (n is not node and getattr(n, _REBINDS.get(type(n), ""), None) == first)
            or (isinstance(n, ast.alias) and n.asname is None and n.name.split(".")[0] == first)
            or (isinstance(n, ast.Call) and bool({*_dotted(n.func)[0][-1:]} & _SETS_ATTRIBUTES))
        )
        if rebinds:
            return None, set()
        if (isinstance(n, ast.Attribute) and not isinstance(n.ctx, ast.Load)
                and isinstance(n.value, ast.Name) and n.value.id == first):
            reassigned.add(n.attr)
    return first, reassigned


def _peel_index(wrapper: types.FunctionType) -> int | None:
    """The closure cell of ``wrapper`` holding the function it decorates, or ``None``
    (nnsight's rule: the one free variable holding a Python function that its source calls
    by name; none or several is no decorated function)."""
    code = wrapper.__code__
    if not code.co_freevars:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError):
        return None
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    candidates = [
        i for i, (name, cell) in enumerate(zip(code.co_freevars, wrapper.__closure__ or ()))
        if name in called and isinstance(getattr(cell, "cell_contents", None), types.FunctionType)
    ]
    return candidates[0] if len(candidates) == 1 else None


def _peel(func: types.FunctionType) -> types.FunctionType:
    """``func`` with its decorators peeled (see the module docstring); an injected function
    gives the function it was made from."""
    if func.__code__.co_filename.startswith("<nnsight_dist.source "):
        func = func.__wrapped__
    seen = {func}
    while (index := _peel_index(func)) is not None:
        func = func.__closure__[index].cell_contents
        if func in seen:  # a closure that calls itself
            break
        seen.add(func)
    return func


def _parse_def(fn: types.FunctionType) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]:
    """The ``def`` of ``fn`` (decorators removed, line numbers 1-based in its text) and the
    text (of its code object: a wrapper's own, not what it wraps; decorators included)."""
    text = inspect.getsource(fn.__code__)
    wrapped = text[:1] in (" ", "\t")
    tree = ast.parse("if 1:\n" + text if wrapped else text)
    node = tree.body[0].body[0] if wrapped else tree.body[0]  # type: ignore[attr-defined]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != fn.__code__.co_name:
        raise ValueError(f"cannot inject {fn.__qualname__}: only functions defined with 'def' are supported")
    if wrapped:
        ast.increment_lineno(node, -1)
    node.decorator_list = []
    return node, text


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


def inject(fn: Callable[..., Any], path: str, call: CallFn = call_through) -> Injected:
    """Rewrite ``fn`` so that every operation in its body goes through ``call``.

    ``fn`` is a function or a bound method (e.g. ``module.forward``); its decorators are
    peeled and dropped (see the module docstring). ``path`` only
    names the compiled code (``<nnsight_dist.source {path}>``). ``call(name, f, args,
    kwargs)`` must return the operation's value.

    Returns :class:`Injected`: ``source``, the function's dedented text (decorator lines
    included, as nnsight shows it); ``lines``, each operation name -> its 1-based line in
    ``source``, in naming order (see the module docstring); ``fn``, a plain function with
    the signature of the peeled function (for a bound method the unbound function,
    taking ``self`` first; bind it with :class:`types.MethodType`), which with the default
    ``call`` behaves exactly like the peeled function; ``attribute_calls`` (see the
    module docstring).

    Raises ``TypeError`` if ``fn`` is not a Python function or method, ``OSError`` if its
    source is unavailable, ``ValueError`` if it is a lambda or uses the reserved names.
    """
    func = fn.__func__ if inspect.ismethod(fn) else fn
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"cannot inject {fn!r}: not a Python function or method")
    func = _peel(func)
    node, text = _parse_def(func)
    reserved = (_CALL, _KW, _BIND, _EVALUATED)
    if any(
        (isinstance(n, ast.Name) and n.id == _FACTORY) or (isinstance(n, ast.Constant) and n.value in reserved)
        for n in ast.walk(node)
    ):
        raise ValueError(f"cannot inject {func.__qualname__}: it uses a name or constant reserved by inject")

    # The def itself is visited like nnsight does (its parameters' defaults and
    # annotations are named); the rewritten defaults never run, `new_fn` keeps the
    # original function's.
    rewriter = _Instrument(*_receiver(node))
    node = rewriter.visit(node)

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
    # Where the code was defined (functools.wraps gives a wrapper the wrapped one's qualname).
    owner = _owner_class(getattr(func.__code__, "co_qualname", func.__qualname__))
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
    code = _bind_placeholders(code, {_CALL: call, _KW: _merge_kwargs, _BIND: bind, _EVALUATED: evaluated})
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=func.__code__.co_qualname)

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

    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    return Injected(textwrap.dedent(text), rewriter.lines, new_fn, rewriter.attribute_calls)


def format_source(source: str, lines: dict[str, int]) -> str:
    """nnsight 0.8.1's listing of ``source`` with its operations (``print(envoy.source)``).

    The first line of ``source`` is marked ``*``; each further line is numbered from 0 (so
    line ``n`` of ``source``, 1-based, shows as ``n - 2``). A line on which operations
    start reads ``" <name> -> <index> <line>"`` (names padded to the longest one); further
    operations on the same line get a continuation row ``" <name> ->  + ..."`` (``...`` at
    the line's indentation); other lines show only the index. Lines are not stripped.
    """
    width = max((len(name) for name in lines), default=0)
    text_lines = source.split("\n")
    rows = [" " * (width + 6) + "* " + text_lines[0]]
    by_line: dict[int, list[str]] = {}
    for name, line in lines.items():
        by_line.setdefault(line - 2, []).append(name)
    for i, line in enumerate(text_lines[1:]):
        names = by_line.get(i)
        if not names:
            rows.append(" " * (width + 4) + f"{i:3d} {line}")
            continue
        rows.append(f" {names[0]:{width}} ->{i:3d} {line}")
        indent = " " * (len(line) - len(line.lstrip()))
        rows.extend(f" {name:{width}} ->  + {indent}..." for name in names[1:])
    return "\n".join(rows)


def format_operation(path: str, source: str, line: int) -> str:
    """nnsight 0.8.1's view of one operation (``print(envoy.source.<op>)``).

    ``path`` (the operation's full name) and a window of ``source`` around its 1-based
    ``line``: from five lines before the body line ``line - 2`` to eight after it, ``....``
    where the window cuts the text, the operation's line as ``"    --> <line> <--"``
    (its first four characters dropped) and the others indented by four.
    """
    text_lines = source.split("\n")
    index = line - 2
    start = max(0, index - 5)
    end = min(len(text_lines) - 1, index + 8)
    rows = [path + ":\n"]
    if start != 0:
        rows.append("    ....")
    for i in range(start, end):
        if i == index + 1:
            rows.append(f"    --> {text_lines[i][4:]} <--")
        else:
            rows.append("    " + text_lines[i])
    if end != len(text_lines) - 1:
        rows.append("    ....")
    return "\n".join(rows)
