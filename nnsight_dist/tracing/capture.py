"""Capture of a ``with`` block's body as code run later, in a scope of its own.

``with model.trace(...):`` must not run its body when Python reaches it: the body is an
intervention that runs later, as a mediator, interleaved with the model. Capture does
four things:

1. *Find* the body: parse the caller's source file and pick the ``with`` statement whose
   header holds the line the caller is on (a header may span several lines).
2. *Compile* it as module-level code with the caller's file name and line numbers, so
   tracebacks point at the user's own lines. Zero-argument ``x.save()`` calls are
   rewritten into ``save_any(x)`` (:func:`..intervention.save.save_any`), so ``.save()``
   works on any object (``[].save()``) without putting a method on every class.
3. *Scope* it: a body runs in a :class:`Scope`, a snapshot of the enclosing names taken
   when the block is entered. A ``tracer.invoke`` opened in a loop sees the loop
   variable as it was at its entry, although it runs after the loop has ended. Names a
   block binds also go to a store shared by the blocks of one trace, which is how an
   invoke reads what another bound (behind a barrier) when the name was not in its own
   snapshot; this is nnsight 0.8.1's rule.
4. *Skip* it: a one-shot line-trace function raises :class:`SkipBody` on the body's
   first line; the context manager's ``__exit__`` swallows it.

After the trace, :func:`push_names` writes the saved names back into the caller's frame.
Compiled bodies are cached per (code object, line), so a loop of traces compiles once.
"""

from __future__ import annotations

import ast
import copy
import ctypes
import linecache
import sys
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Callable, Optional

from ..intervention.errors import TracingSourceError
from ..intervention.save import save_any


class SkipBody(Exception):
    """Raised on the first line of a captured body so that Python does not execute it."""


#: The name rewritten ``.save()`` calls use; resolved by every :class:`Scope`.
_SAVE = "__nd_save__"


class Scope(dict):
    """The namespace one captured block runs in.

    Lookups go, in order, to: this dict (a snapshot of the enclosing names taken when
    the block was entered, plus the block's own bindings), the ``shared`` store of the
    trace (names bound by the other blocks of the same trace), then ``outer`` (the
    module's globals, or the enclosing block's scope). Bindings land here and in
    ``shared``, and are remembered in ``written``: the candidates for writing back.
    Module-level code reads and writes a dict subclass through ``__missing__`` and
    ``__setitem__``, functions defined in the body see it as their globals.
    """

    def __init__(self, own: dict, shared: dict, outer: dict) -> None:
        super().__init__(own)
        self.shared = shared
        self.outer = outer
        self.written: dict[str, None] = {}

    def __missing__(self, key: str) -> Any:
        if key in self.shared:
            return self.shared[key]
        if key == _SAVE:
            return save_any
        return self.outer[key]

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self.shared[key] = value
        self.written[key] = None

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self.shared.pop(key, None)
        self.written.pop(key, None)

    def writes(self) -> dict[str, Any]:
        """The names this block bound, with their current values."""
        return {k: dict.__getitem__(self, k) for k in self.written if dict.__contains__(self, k)}


def scope(frame: FrameType, shared: Optional[dict] = None) -> Scope:
    """A new scope for a block entered in ``frame``: a snapshot of what ``frame`` sees.

    In a block nested in another captured block (an invoke in a trace body), the snapshot
    is the enclosing block's names and the shared store is the enclosing one's unless
    ``shared`` is given (a trace inside a session gets a store of its own).
    """
    outer = frame.f_globals
    if isinstance(outer, Scope):
        own = dict(outer)
        if frame.f_locals is not outer:  # a function defined in the enclosing body
            own.update(frame.f_locals)
        return Scope(own, outer.shared if shared is None else shared, outer)
    return Scope(dict(frame.f_locals), {} if shared is None else shared, outer)


@dataclass(frozen=True)
class Body:
    """A compiled ``with`` body: call :meth:`bind` to get a runnable function."""

    code: CodeType
    filename: str
    lineno: int
    #: Line of the body's first statement (below a header that may span several lines).
    first: int
    #: The body is only ``pass``/constants: Python runs it outside the ``with`` block's
    #: exception handling, so it must not be skipped by raising (running it is harmless).
    trivial: bool = False
    #: The body's source calls ``.backward(`` somewhere (nested blocks included): known
    #: before the model runs. A backward called from a function defined elsewhere is not seen.
    calls_backward: bool = False

    def bind(self, namespace: Scope) -> Callable[[], Any]:
        """Return the body as a function running in ``namespace``."""
        code = self.code

        def body() -> None:
            exec(code, namespace)

        return body


_BODIES: dict[tuple[CodeType, int], Body] = {}
_OPENS: dict[tuple[CodeType, int, str], bool] = {}
_TREES: dict[str, tuple[int, ast.Module]] = {}


def capture(frame: FrameType) -> Body:
    """Compile the body of the ``with`` statement that ``frame`` is entering.

    Raises :class:`TracingSourceError` when the source is unavailable (code typed at a
    bare interpreter prompt, or compiled from a string) or holds no matching ``with``.
    """
    key = (frame.f_code, frame.f_lineno)
    body = _BODIES.get(key)
    if body is None:
        body = _compile(frame)
        _BODIES[key] = body
    return body


def opens_with(frame: FrameType, method: str) -> bool:
    """Whether the line ``frame`` runs is the header of a ``with`` statement whose context
    is a call of ``.method(...)`` (``with loss.backward():``), as opposed to a plain call.

    False when the source is unavailable. Cached per (code object, line).
    """
    key = (frame.f_code, frame.f_lineno, method)
    found = _OPENS.get(key)
    if found is None:
        try:
            node = _find_with(_tree(frame.f_code.co_filename, frame.f_globals), frame.f_lineno)
        except (TracingSourceError, SyntaxError):
            found = False
        else:
            found = any(_calls(item.context_expr, method) for item in node.items)
        _OPENS[key] = found
    return found


def _calls(node: ast.AST, method: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method


def _tree(filename: str, module_globals: dict) -> ast.Module:
    lines = linecache.getlines(filename, module_globals)
    if not lines:
        raise TracingSourceError(
            f"cannot read the source of {filename!r}: nnsight_dist needs the source of a "
            "`with model.trace(...)` block. Run the code from a file, a notebook cell or "
            "`python -c` replaced by a script."
        )
    cached = _TREES.get(filename)
    text = "".join(lines)
    if cached is not None and cached[0] == hash(text):
        return cached[1]
    tree = ast.parse(text, filename)
    _TREES[filename] = (hash(text), tree)
    return tree


def _find_with(tree: ast.Module, line: int) -> ast.With:
    """The innermost ``with`` whose header (``with`` line to the line before its body)
    holds ``line``."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            if node.lineno <= line < node.body[0].lineno or line == node.lineno:
                if best is None or node.lineno >= best.lineno:
                    best = node
    if best is None:
        raise TracingSourceError(f"no `with` statement found at line {line}")
    return best


class _SaveCalls(ast.NodeTransformer):
    """``x.save()`` (no arguments) becomes ``__nd_save__(x)``, at the same location."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "save" and not node.args and not node.keywords:
            call = ast.Call(func=ast.Name(id=_SAVE, ctx=ast.Load()), args=[func.value], keywords=[])
            return ast.copy_location(call, node)
        return node


def _compile(frame: FrameType) -> Body:
    filename = frame.f_code.co_filename
    node = _find_with(_tree(filename, frame.f_globals), frame.f_lineno)
    first = node.body[0].lineno
    if first == node.lineno:
        raise TracingSourceError(
            f"{filename}:{node.lineno}: the body of a traced `with` must start on its own line"
        )
    # Rewrite copies of the statements: the cached tree stays as parsed.
    body = [_SaveCalls().visit(copy.deepcopy(st)) for st in node.body]
    module = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(module)
    try:
        code = compile(module, filename, "exec")
    except SyntaxError as e:
        raise TracingSourceError(f"cannot compile the body at {filename}:{node.lineno}: {e}") from e
    code = code.replace(co_name=frame.f_code.co_name)
    trivial = all(isinstance(st, ast.Pass) or (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))
                  for st in node.body)
    backward = any(_calls(n, "backward") for st in node.body for n in ast.walk(st))
    return Body(code, filename, node.lineno, first, trivial, backward)


def skip_body(frame: FrameType, first: int) -> Callable[[], None]:
    """Arrange for ``frame`` to raise :class:`SkipBody` when it reaches line ``first``.

    Lines before ``first`` belong to the ``with`` header (which may span several lines,
    and still has its ``as`` name to bind): they run. Returns a function that restores
    the tracing state that was there before; call it once the ``SkipBody`` has been
    caught (a raising trace function unsets tracing).
    """
    previous = sys.gettrace()

    def raiser(f: FrameType, event: str, arg: Any):
        if event == "line" and f is frame and f.f_lineno >= first:
            f.f_trace = None
            raise SkipBody()
        return raiser

    sys.settrace(_ignore)
    frame.f_trace = raiser

    def restore() -> None:
        frame.f_trace = None
        sys.settrace(previous)

    return restore


def _ignore(frame: FrameType, event: str, arg: Any) -> None:
    return None


def push_names(frame: FrameType, names: dict[str, Any]) -> None:
    """Bind ``names`` in the caller's scope: module globals, function locals, or the
    scope of an enclosing captured block (a trace inside a session)."""
    if not names:
        return
    target = frame.f_globals
    if isinstance(target, Scope):
        for k, v in names.items():
            target[k] = v
        return
    if frame.f_locals is target:
        target.update(names)
        return
    if sys.version_info >= (3, 13):
        for k, v in names.items():
            frame.f_locals[k] = v
        return
    frame.f_locals.update(names)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
