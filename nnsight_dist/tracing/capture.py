"""Capture of a ``with`` block's body as a function.

``with model.trace(...):`` must not run its body when Python reaches it: the body is an
intervention that runs later, as a mediator, interleaved with the model. Capture does
three things:

1. *Find* the body: parse the caller's source file and pick the ``with`` statement whose
   header holds the line the caller is on.
2. *Compile* it into a function ``__nd_body__()`` with the caller's file name and line
   numbers, so tracebacks point at the user's own lines. Every name the body assigns is
   declared ``global``, and the function's globals are a *namespace* shared by the whole
   trace (the caller's globals and locals, copied). That is how an invoke sees the names
   of the trace body around it, and how two invokes exchange values.
3. *Skip* the body: a one-shot line-trace function raises :class:`SkipBody` on the
   body's first line; the context manager's ``__exit__`` swallows it.

After the trace, :func:`push_names` writes the saved names back into the caller's frame.
Compiled bodies are cached per (code object, line), so a loop of traces compiles once.
"""

from __future__ import annotations

import ast
import ctypes
import linecache
import sys
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Callable

from ..intervention.errors import TracingSourceError


class SkipBody(Exception):
    """Raised on the first line of a captured body so that Python does not execute it."""


@dataclass(frozen=True)
class Body:
    """A compiled ``with`` body: call :meth:`bind` to get a runnable function."""

    code: CodeType
    filename: str
    lineno: int
    #: Names the body binds: the candidates for writing back into the caller's scope.
    names: frozenset
    #: The body is only ``pass``/constants: Python runs it outside the ``with`` block's
    #: exception handling, so it must not be skipped by raising (running it is harmless).
    trivial: bool = False

    def bind(self, namespace: dict) -> Callable[[], Any]:
        """Return the body as a function whose globals are ``namespace``."""
        from types import FunctionType

        return FunctionType(self.code, namespace, "__nd_body__")


_BODIES: dict[tuple[CodeType, int], Body] = {}
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
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            first = node.body[0].lineno
            if node.lineno <= line and (line < first or line == node.lineno):
                if best is None or node.lineno >= best.lineno:
                    best = node
    if best is None:
        raise TracingSourceError(f"no `with` statement found at line {line}")
    return best


class _Assigned(ast.NodeVisitor):
    """Names bound in a body's own scope (not inside nested functions or classes)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.names.add(node.id)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.names.add(node.name)
        for deco in node.decorator_list:
            self.visit(deco)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.add(node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return

    def _comprehension(self, node: ast.AST) -> None:
        # Only named expressions leak out of a comprehension's scope.
        for sub in ast.walk(node):
            if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                self.names.add(sub.target.id)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_alias(self, node: ast.alias) -> None:
        self.names.add((node.asname or node.name).split(".")[0])

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)


def _compile(frame: FrameType) -> Body:
    filename = frame.f_code.co_filename
    node = _find_with(_tree(filename, frame.f_globals), frame.f_lineno)
    finder = _Assigned()
    for stmt in node.body:
        finder.visit(stmt)
    body: list[ast.stmt] = []
    if finder.names:
        body.append(ast.Global(names=sorted(finder.names)))
    body.extend(node.body)
    fn = ast.FunctionDef(
        name="__nd_body__",
        args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=body,
        decorator_list=[],
        returns=None,
        **({"type_params": []} if sys.version_info >= (3, 12) else {}),
    )
    module = ast.Module(body=[fn], type_ignores=[])
    ast.copy_location(fn, node.body[0])
    for stmt in body[:1]:
        ast.copy_location(stmt, node.body[0])
    ast.fix_missing_locations(module)
    try:
        code = compile(module, filename, "exec")
    except SyntaxError as e:
        raise TracingSourceError(f"cannot compile the body at {filename}:{node.lineno}: {e}") from e
    fn_code = next(c for c in code.co_consts if isinstance(c, CodeType))
    trivial = all(isinstance(st, ast.Pass) or (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))
                  for st in node.body)
    return Body(fn_code, filename, node.lineno, frozenset(finder.names), trivial)


def namespace(frame: FrameType) -> dict:
    """The namespace a body runs in: copies of the caller's globals and locals.

    A body captured inside another body (an invoke in a trace) shares its namespace, so
    invokes see the trace body's names and each other's.
    """
    if _SHARED in frame.f_globals:
        return frame.f_globals
    ns = dict(frame.f_globals)
    if frame.f_locals is not frame.f_globals:
        ns.update(frame.f_locals)
    ns[_SHARED] = True
    return ns


_SHARED = "__nd_namespace__"


def skip_body(frame: FrameType) -> Callable[[], None]:
    """Arrange for ``frame`` to raise :class:`SkipBody` on its next line.

    Returns a function that restores the tracing state that was there before; call it once
    the ``SkipBody`` has been caught (a raising trace function unsets tracing).
    """
    previous = sys.gettrace()

    def raiser(f: FrameType, event: str, arg: Any):
        if event == "line" and f is frame:
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
    """Bind ``names`` in the caller's scope (module globals or function locals)."""
    if not names:
        return
    if frame.f_locals is frame.f_globals:
        frame.f_globals.update(names)
        return
    if sys.version_info >= (3, 13):
        for k, v in names.items():
            frame.f_locals[k] = v
        return
    frame.f_locals.update(names)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
