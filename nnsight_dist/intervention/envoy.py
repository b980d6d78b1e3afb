"""The Envoy tree: a proxy for every module of the model.

An :class:`Envoy` mirrors one ``torch.nn.Module``. Its children are Envoys too, so
``model.model.layers[3].mlp`` walks the tree as it would walk the modules. Inside a trace
its eproperties reach the running model: ``.output``, ``.inputs`` (``(args, kwargs)``) and
``.input`` (the first argument) are read and written at the locations
``<path>.output`` / ``<path>.input``; ``.skip(value)`` replaces the module's call;
calling an Envoy runs its module ad hoc. ``.source`` lists the operations inside the
module's forward, each an envoy of its own. Outside a trace, attribute access falls
through to the module (``model.config``, ``model.lm_head.weight``).
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator, Optional, Union

import torch
from torch.nn.modules.module import _addindent

from .eproperty import eproperty
from .errors import ModulePathError
from .interleaver import Interleaver

Rename = dict[str, Union[str, list[str]]]
#: ``envoys=``: one Envoy subclass for every module, or a map from a module type (matched
#: along the module's MRO) or a path suffix (``"self_attn"``, ``"layers.*"``) to one.
EnvoyClasses = Union[type, dict]


def _whole(value: Any, interleaver: Interleaver) -> Any:
    """A tensor-parallel parameter whole (``DTensor.full_tensor``, a collective), else as is.

    The whole copy stands for the parameter in a backward block: its ``.grad`` is the
    parameter's gradient (see :meth:`.backward.Origins.alias`)."""
    if not hasattr(value, "full_tensor"):
        return value
    whole = value.full_tensor()
    interleaver.origins.alias(whole, value)
    return whole


class Interventions:
    """What a location-bearing proxy offers inside a trace: ``.output``, ``.inputs``,
    ``.input`` and ``.skip``. Needs ``path`` and ``interleaver`` attributes."""

    @eproperty(key="output")
    def output(self):
        """The module's output at this visit (read or assign to replace it)."""

    @eproperty(key="input")
    def inputs(self):
        """The module's inputs at this visit, as ``(args, kwargs)``."""

    @eproperty(key="input")
    def input(self):
        """The module's first input (first positional argument, else first keyword)."""

    @input.preprocess
    def input(self, value):
        args, kwargs = value
        return [*args, *kwargs.values()][0]

    @input.postprocess
    def input(self, value):
        args, kwargs = self.inputs
        if args:
            return (value, *args[1:]), kwargs
        first = next(iter(kwargs))
        return (), {**kwargs, first: value}

    def skip(self, value: Any) -> None:
        """Do not run this module at its next visit; use ``value`` as its output."""
        self.interleaver.skip(self.path, value)


class Envoy(Interventions):
    """Proxy of one module; see the module docstring."""

    def __init__(
        self,
        module: torch.nn.Module,
        interleaver: Optional[Interleaver] = None,
        path: str = "model",
        rename: Optional[Rename] = None,
        envoys: Optional[EnvoyClasses] = None,
    ) -> None:
        root = interleaver is None
        self.__dict__["path"] = path
        self.__dict__["_module"] = module
        self.__dict__["interleaver"] = interleaver if interleaver is not None else Interleaver()
        self.__dict__["_children"] = []
        self.__dict__["_named"] = {}
        self.__dict__["_fakes"] = {}
        self.__dict__["_source"] = None
        self.__dict__["_rename"] = rename
        self.__dict__["_aliases"] = {}
        if root:
            _check_envoys(envoys)
        self._point = self.interleaver.wrap_module(module, path, root=root)
        for name, child in module.named_children():
            child_path = f"{path}.{name}"
            cls = envoy_class(envoys, rename, child, child_path)
            envoy = cls(child, interleaver=self.interleaver, path=child_path, rename=rename, envoys=envoys)
            self._children.append(envoy)
            self._named[name] = envoy
        if rename:
            self._build_aliases(rename)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module. Inside a trace this is an ad-hoc call: no visits, no hooks."""
        if self.interleaver.active:
            return self.interleaver.call(self._point, args, kwargs)
        return self._module(*args, **kwargs)

    # ------------------------------------------------------------------ devices (as nnsight)

    def to(self, *args: Any, **kwargs: Any) -> "Envoy":
        """Move the module (``torch.nn.Module.to``, in place) and return this envoy."""
        self._module.to(*args, **kwargs)
        return self

    def cpu(self, *args: Any, **kwargs: Any) -> "Envoy":
        """Move the module to the CPU (in place) and return this envoy."""
        self._module.cpu(*args, **kwargs)
        return self

    def cuda(self, *args: Any, **kwargs: Any) -> "Envoy":
        """Move the module to the GPU (in place) and return this envoy."""
        self._module.cuda(*args, **kwargs)
        return self

    @property
    def device(self) -> Optional[torch.device]:
        """The device of the module's first parameter (``None`` without parameters)."""
        return next((p.device for p in self._module.parameters()), None)

    @property
    def devices(self) -> set:
        """Every device the module's parameters live on."""
        return {p.device for p in self._module.parameters()}

    @property
    def source(self):
        """The operations inside this module's forward (printable; each has .input/.output)."""
        if self._source is None:
            from .source import EnvoySource

            self.__dict__["_source"] = EnvoySource.of_module(self)
        return self._source

    # ------------------------------------------------------------------ tree

    def modules(self) -> list["Envoy"]:
        """This envoy and every envoy below it, depth first."""
        return [envoy for _, envoy in self.named_modules()]

    def named_modules(self) -> list[tuple[str, "Envoy"]]:
        """``(path, envoy)`` for this envoy and every envoy below it, depth first."""
        found = [(self.path, self)]
        for child in self._children:
            found.extend(child.named_modules())
        return found

    def get(self, path: str) -> "Envoy":
        """The envoy at ``path`` relative to this one (``"model.layers.0.mlp"``)."""
        envoy = self
        for part in [p for p in path.split(".") if p]:
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def __getitem__(self, key: int) -> "Envoy":
        try:
            return self._children[key]
        except IndexError:
            n = len(self._children)
            raise ModulePathError(
                f"{self.path} ({type(self._module).__name__}) has {n} children, so no [{key}]: "
                f"use an index from 0 to {n - 1} (or -{n} to -1)" if n else
                f"{self.path} ({type(self._module).__name__}) has no children, so no [{key}]"
            ) from None

    def __iter__(self) -> Iterator["Envoy"]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def __getattr__(self, name: str) -> Any:
        named = self.__dict__.get("_named")
        if named is not None and name in named:
            return named[name]
        aliases = self.__dict__.get("_aliases")
        if aliases and name in aliases:
            return self.get(aliases[name])
        module = self.__dict__.get("_module")
        if module is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.interleaver.seam.attribute(self.path, name, lambda: _whole(getattr(module, name), self.interleaver))
        except AttributeError:
            pass
        near = difflib.get_close_matches(name, [*named, *aliases], n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        children = ", ".join(named) or "none"
        raise ModulePathError(
            f"{self.path} ({type(module).__name__}) has no module or attribute {name!r}.{hint} "
            f"Its children are: {children}."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(type(self), name) or name in self.__dict__ or name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)

    def _build_aliases(self, rename: Rename) -> None:
        for name, aliases in rename.items():
            target = name.strip(".")
            try:
                self.get(target)
            except (AttributeError, IndexError, ValueError):
                continue
            for alias in [aliases] if isinstance(aliases, str) else aliases:
                self._aliases[alias.strip(".")] = target

    def __repr__(self) -> str:
        module = self._module
        lines = []
        extra = module.extra_repr()
        if extra and not self._children:
            return f"{module._get_name()}({extra})"
        if isinstance(module, torch.nn.ModuleList) and self._children:
            reprs = [repr(c) for c in self._children]
            start = 0
            for i in range(1, len(reprs) + 1):
                if i == len(reprs) or reprs[i] != reprs[start]:
                    key = f"{start}" if i - 1 == start else f"{start}-{i - 1}: {i - start} x"
                    lines.append(_addindent(f"({key}): {reprs[start]}" if i - 1 == start else f"({start}-{i - 1}): {i - start} x {reprs[start]}", 2))
                    start = i
        else:
            names = {v: k for k, v in self._aliases.items()}
            for name, child in self._named.items():
                label = f"{names[name]}/{name}" if name in names else name
                lines.append(_addindent(f"({label}): {child!r}", 2))
        body = "\n  " + "\n  ".join(lines) + "\n" if lines else ""
        return f"{module._get_name()}({body})"


def _check_envoys(envoys: Any) -> None:
    if envoys is None or isinstance(envoys, dict) or (isinstance(envoys, type) and issubclass(envoys, Envoy)):
        return
    raise TypeError(
        f"envoys= takes an Envoy subclass or a dict from module type (or path suffix) to an "
        f"Envoy subclass, not {type(envoys).__name__}"
    )


def envoy_class(envoys: Optional[EnvoyClasses], rename: Optional[Rename], module: torch.nn.Module, path: str) -> type:
    """The Envoy class for ``module`` at ``path`` under ``envoys=`` (nnsight 0.8.1's rules).

    A class applies to every module. A dict is tried in this order: a module-type key on
    ``type(module).__mro__`` (the most derived type first); then a path-suffix key, matched
    component-wise (``*`` matches one component) against the path and against each of its
    spellings under the ``rename`` aliases. Nothing matching gives :class:`Envoy`.
    """
    if envoys is None or isinstance(envoys, type):
        return envoys or Envoy
    for cls in type(module).__mro__:
        if cls in envoys:
            return envoys[cls]
    for spelling in _spellings(rename or {}, path):
        for key, cls in envoys.items():
            if isinstance(key, str) and _ends_with(spelling, key):
                return cls
    return Envoy


def _ends_with(path: str, key: str) -> bool:
    parts, keys = path.split("."), key.strip(".").split(".")
    return len(keys) <= len(parts) and all(k in ("*", p) for p, k in zip(parts[-len(keys):], keys))


def _spellings(rename: Rename, path: str) -> list[str]:
    """``path`` and every spelling of it under the aliases (a key's components replaced by an alias)."""
    parts = path.split(".")
    if len(parts) == 1:
        return [path]
    found = [f"{prefix}.{parts[-1]}" for prefix in _spellings(rename, ".".join(parts[:-1]))]
    for key, aliases in rename.items():
        size = key.strip(".").count(".") + 1
        if size >= len(parts) or not _ends_with(path, key):
            continue
        host = ".".join(parts[: len(parts) - size])
        for alias in [aliases] if isinstance(aliases, str) else aliases:
            found += [f"{prefix}.{alias.strip('.')}" for prefix in _spellings(rename, host)]
    return found
