"""Helpers several test modules share (``tests/`` is on ``sys.path`` under pytest).

Not fixtures: plain functions, imported as ``from helpers import ...``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def example(name: str):
    """The example module ``examples/<name>.py`` (the examples import each other by name)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def last_token_loss(logits, row: int = 0):
    """A scalar loss of the logits: the log-sum-exp at the last position of ``row``."""
    return logits[row, -1].logsumexp(-1)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out
