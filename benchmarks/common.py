"""What the benchmark scripts share: the prompt and scenarios, nest helpers, the value
check, the rotating timing loop, robust statistics, table rendering and argument parsing.

``benchmarks/overhead.py`` (one process) and ``benchmarks/distributed.py`` (every rank of a
sharded model) both import this module. They are run as scripts, not as a package, so
each puts its own directory first on ``sys.path`` and then does ``import common``.
Nothing here imports nnsight_dist or nnsight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm import tqdm

PROMPT = "The Eiffel Tower is in the city of"
SCENARIOS = ("empty", "one_save", "every_layer", "one_edit", "cache", "generate")
GENERATE_TOKENS = 3

Times = dict[str, dict[str, list[float]]]  # [scenario][variant] -> seconds, one per repetition


# ---------------------------------------------------------------------------- nests and hooks


def flat(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest (tuples, lists, dicts, model outputs), depth first."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat(v)]
    return []


def nbytes(value: Any) -> int:
    """Payload bytes of every tensor in the nest ``value``."""
    return sum(t.numel() * t.element_size() for t in flat(value))


@contextlib.contextmanager
def hooks(pairs: list[tuple[torch.nn.Module, Callable]]):
    """Forward hooks ``(module, fn)`` registered for the duration of the block, then removed
    (also when the block raises)."""
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def same(ref: Any, got: Any, fragments: bool = False) -> Optional[str]:
    """``None`` when ``got`` holds the tensors of ``ref`` (same count and shapes, values
    ``torch.equal`` or ``allclose(atol=1e-5, rtol=1e-5)``), else a one-line description.

    Two dicts are caches (path -> output): their keys must agree and each entry is
    compared. ``fragments=False`` reports the first differing entry and a shape mismatch
    as ``shapes A vs B``; ``fragments=True`` (sharded models) reports how many entries
    differ with the first three, and a shape mismatch as a possible fragment of ``ref``.
    """
    if type(ref) is dict and type(got) is dict:
        if set(ref) != set(got):
            return f"keys differ: {sorted(set(ref) ^ set(got))[:5]}"
        if not fragments:
            return next((f"{key}: {p}" for key in ref for p in [same(ref[key], got[key])] if p), None)
        problems = [f"{key}: {p}" for key in ref for p in [same(ref[key], got[key], True)] if p]
        if not problems:
            return None
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return f"{len(problems)} of {len(ref)} entries differ: " + "; ".join(problems[:3]) + more
    ta, tb = flat(ref), flat(got)
    if len(ta) != len(tb):
        return f"{len(ta)} tensors vs {len(tb)}"
    if not ta and type(ref) is not type(got):
        return f"{type(ref).__name__} vs {type(got).__name__}"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            if fragments:
                return f"shape {tuple(y.shape)}, whole value {tuple(x.shape)} (a fragment?)"
            return f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        if not torch.equal(x, y) and not torch.allclose(x.float(), y.float(), atol=1e-5, rtol=1e-5):
            return f"values differ (max |diff| {(x.float() - y.float()).abs().max().item():.3g})"
    return None


# ---------------------------------------------------------------------------- timing


def measure_rotating(run: Callable[[str, str], Any], scenarios: list[str], variants: list[str], reps: int,
                     warmup: int, desc: str, progress: bool,
                     active: Callable[[str, str], bool] = lambda v, name: True) -> Times:
    """Time ``run(variant, scenario)`` with ``time.perf_counter``: first ``warmup`` untimed
    rounds, then ``reps`` repetitions, each running every scenario's variants once in
    rotating order (repetition ``k`` starts at ``variants[k % len(variants)]``), so slow
    drifts of the machine hit every variant alike. Pairs for which ``active`` is false are
    neither run nor timed (their lists stay empty). ``progress`` shows a tqdm bar labelled
    ``desc`` on stderr. Returns seconds, ``[scenario][variant] -> one per repetition``."""
    times = {name: {v: [] for v in variants} for name in scenarios}
    for _ in range(warmup):
        for name in scenarios:
            for v in variants:
                if active(v, name):
                    run(v, name)
    clock = time.perf_counter
    bar = tqdm(range(reps), desc=desc, unit="rep", disable=not progress, file=sys.stderr)
    for rep in bar:
        for name in scenarios:
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:  # rotating order (the same on every rank)
                if not active(v, name):
                    continue
                t0 = clock()
                run(v, name)
                times[name][v].append(clock() - t0)
    return times


# ---------------------------------------------------------------------------- statistics


def median_ms(times: list[float]) -> float:
    """The median of ``times`` (seconds) in milliseconds."""
    return statistics.median(times) * 1e3


def median_se(values: list[float]) -> float:
    """Standard error of the median, from the median absolute deviation (robust):
    ``1.2533 * 1.4826 * MAD / sqrt(n)``."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    return 1.2533 * 1.4826 * mad / max(len(values), 1) ** 0.5


def paired(times: list[float], base: list[float]) -> tuple[float, float]:
    """``(median, standard error)`` in ms of the per-repetition differences ``times - base``
    (seconds, paired by position)."""
    diffs = [(t - b) * 1e3 for t, b in zip(times, base)]
    return statistics.median(diffs), median_se(diffs)


def pm(median: float, se: float) -> str:
    """A paired difference as a cell: ``+1.23±0.45``."""
    return f"{median:+.2f}±{se:.2f}"


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    """``value`` formatted with ``spec``, or ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


# ---------------------------------------------------------------------------- output


def render(header: Iterable[str], body: list[list[str]], markdown: bool, left: int = 1) -> str:
    """A table of string cells: Markdown (the first ``left`` columns left-aligned, the rest
    right-aligned), or plain text with columns padded to their widths, two spaces apart,
    and a rule of dashes under the header."""
    header = list(header)
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]

    def line(cs: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` as JSON (indent 1)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def say(*args: Any) -> None:
    """``print`` to stderr, flushed."""
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- arguments


def choices(valid: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated, non-empty list of items of ``valid``
    (blanks dropped), else ``ArgumentTypeError`` naming the unknown ``what``."""
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(valid)}")
        return items

    return parse


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc`` (a module docstring)."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
