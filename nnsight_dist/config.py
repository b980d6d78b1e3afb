"""``nd.CONFIG``: nnsight's configuration object, with the same sections and fields.

nnsight 0.8.1 keeps its settings in one object, ``CONFIG``, with two sections:
``CONFIG.APP`` (client behaviour: ``DEBUG``, ``REMOTE_LOGGING``, ``PYMOUNT``,
``DISABLE_CPP_BACKTRACE``) and ``CONFIG.API`` (the NDIF service: ``HOST``, ``APIKEY``,
``COMPRESS``). Code written for nnsight reads and sets them; here they exist with the same
names and defaults, and assigning a field a section does not have raises ``ValueError``
as nnsight does (``"AppConfig" object has no field "FOO"``).

What they do here:

- ``APP.DEBUG``: keep nnsight_dist's own frames (and torch's module-call frames) in the
  traceback of an error raised by a traced block; they are stripped otherwise so that the
  traceback points at the user's lines. Read when the error is raised, so setting it
  mid-run takes effect. Also set by the ``NNSIGHT_DEBUG`` environment variable.
- ``APP.DISABLE_CPP_BACKTRACE``: read from ``NNSIGHT_DISABLE_CPP_BACKTRACE`` like nnsight;
  nothing here depends on it (no C extension).
- ``APP.PYMOUNT``, ``APP.REMOTE_LOGGING`` and the ``API`` section: kept for code that sets
  them; they change nothing (``.save()`` is installed on tensors and model outputs only,
  and there is no remote service).

Unlike nnsight, no user config file is read and ``-v`` on the command line does not turn on
``DEBUG`` (a test runner's ``-v`` would change every traceback).
"""

from __future__ import annotations

import os
from typing import Any, Optional


class Section:
    """A group of settings: the fields are the class's annotated attributes.

    Reading or writing a field is plain attribute access; writing a name that is not a
    field raises ``ValueError`` (nnsight's configuration objects are pydantic models,
    which do the same). Values are not type-checked on assignment, as in nnsight.
    """

    def __init__(self, **values: Any) -> None:
        for name in self.fields():
            object.__setattr__(self, name, getattr(type(self), name))
        for name, value in values.items():
            setattr(self, name, value)

    @classmethod
    def fields(cls) -> list[str]:
        """The names of the fields, in declaration order."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names.extend(n for n in klass.__dict__.get("__annotations__", {}) if n not in names)
        return names

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.fields():
            raise ValueError(f'"{type(self).__name__}" object has no field "{name}"')
        object.__setattr__(self, name, value)

    def model_dump(self) -> dict:
        """The settings as a nested dict (nnsight's pydantic ``model_dump``)."""
        return {
            name: value.model_dump() if isinstance(value, Section) else value
            for name, value in ((n, getattr(self, n)) for n in self.fields())
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.fields())
        return f"{type(self).__name__}({inner})"

    def __str__(self) -> str:
        return " ".join(f"{name}={getattr(self, name)!r}" for name in self.fields())


class ApiConfig(Section):
    """``CONFIG.API``: settings of nnsight's remote service (no effect here)."""

    HOST: str = "https://api.ndif.us"
    APIKEY: Optional[str] = None
    COMPRESS: bool = True


class AppConfig(Section):
    """``CONFIG.APP``: client behaviour (see the module docstring for what each does here)."""

    DEBUG: bool = False
    REMOTE_LOGGING: bool = True
    PYMOUNT: bool = True
    DISABLE_CPP_BACKTRACE: bool = True


class Config(Section):
    """The configuration object, ``nd.CONFIG``: sections ``API`` and ``APP``."""

    API: ApiConfig = None  # type: ignore[assignment]  (a fresh section per Config)
    APP: AppConfig = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(API=ApiConfig(), APP=AppConfig())

    @classmethod
    def load(cls) -> "Config":
        """Defaults, then the environment: ``NNSIGHT_DEBUG`` and
        ``NNSIGHT_DISABLE_CPP_BACKTRACE`` as nnsight reads them."""
        config = cls()
        if os.environ.get("NNSIGHT_DEBUG"):
            config.APP.DEBUG = True
        flag = os.environ.get("NNSIGHT_DISABLE_CPP_BACKTRACE")
        if flag is not None:
            config.APP.DISABLE_CPP_BACKTRACE = flag.strip().lower() not in ("0", "false", "no", "off", "")
        return config


CONFIG = Config.load()
