"""Distributed tests run in check mode: every value served as whole is compared across the
ranks of its tensor-parallel group (``NNSIGHT_DIST_CHECK``; forked ranks inherit it)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _check_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNSIGHT_DIST_CHECK", "1")
