"""Per-trace overhead: plain PyTorch vs nnsight_dist vs nnsight, side by side.

What is measured
----------------
The wall-clock time of one complete *trace* (entering the ``with`` block, capturing its
body, running the model with the interventions interleaved, and writing the saved names
back) for the same model checkpoint, in three variants:

* ``torch``: the plain-PyTorch equivalent -- a HuggingFace forward (or ``generate``) with
  the equivalent forward hooks registered before the call and removed after it;
* ``nnsight_dist``: ``nd.LanguageModel(dir)`` and a ``with model.trace(...)`` block;
* ``nnsight``: ``nnsight.LanguageModel(dir, dispatch=True)`` (the installed nnsight,
  0.8.1 when this was written) and the same block.

The *overhead* of a library in a scenario is the median, over repetitions, of
``t_library - t_torch`` measured in the same repetition (paired differences, so slow
drifts of the machine cancel), with its standard error (``1.25 * 1.48 * MAD / sqrt(n)``);
the table also gives the median time of each variant and the ratios of the medians.

Scenarios (``--scenarios``):

=============  ======================================  ========================================
scenario       nnsight_dist / nnsight body             plain PyTorch equivalent
=============  ======================================  ========================================
empty          no intervention                         forward, no hooks
one_save       ``save(layers[mid].output)``            one hook storing that output
every_layer    ``save`` the output of every layer      one storing hook per layer
one_edit       ``layers[mid].output[:, -1] = 0``       one hook editing the output in place
cache          ``tracer.cache()``                      a storing (detaching) hook on every
                                                       module, the root included
generate       ``generate(max_new_tokens=3,            HF ``generate(max_new_tokens=3,
               do_sample=False)``, read                do_sample=False)`` with a hook on
               ``lm_head.output[:, -1].argmax(-1)``    ``lm_head`` doing the same read per
               in ``for step in tracer.iter[:3]``,     step
               save ``tracer.result``
=============  ======================================  ========================================

``mid`` is the middle decoder layer. All three variants get the same tokenized prompt
(a ``BatchEncoding`` with ``input_ids`` and ``attention_mask``), so tokenization is not
timed; each library's own input handling (batching, padding) is. Autograd is left on,
as in a user's default ``model.trace``. Saves use the function forms ``nd.save(x)`` and
``nnsight.save(x)``: nnsight mounts a ``.save`` method on every object and nnsight_dist
adds ``Tensor.save`` only when none exists, so with both libraries imported in one
process, ``tensor.save()`` reaches only one of them.

Before timing, every scenario runs once per variant with a check read added (the final
logits where the body saves nothing) and the values are compared (``torch.equal``,
else ``allclose(atol=1e-5)``); a mismatch aborts the run. Then each repetition runs,
for every scenario, the three variants once each in rotating order (``torch, nd,
nnsight``, then ``nd, nnsight, torch``, ...).

Model sizes (``--sizes``):

* ``tiny``: ``nd.testing.make_tiny_model(dir, arch="llama")`` with its defaults (4
  layers, hidden 128, vocab 512; 0.8M parameters);
* ``gpt2-small``: ``make_tiny_model(dir, arch="gpt2", layers=12, hidden=768, heads=12,
  intermediate=3072, vocab=50257)``: the GPT-2-small shape (124M parameters) with random
  weights. The embedding has GPT-2's 50257 rows, but the locally trained tokenizer stops
  at ~5300 tokens (its corpus supports no more merges), so rows above that are never
  produced by the tokenizer; that changes nothing in the cost of a forward. Positions
  are limited to 256 (GPT-2: 1024), which does not matter for a short prompt.

Running
-------
::

    . .venv/bin/activate
    python benchmarks/overhead.py                       # both sizes, all scenarios
    python benchmarks/overhead.py --sizes tiny --reps 200 --scenarios empty,one_save
    python benchmarks/overhead.py --model-dir /tmp/nd_models   # keep/reuse the models
    python benchmarks/overhead.py --markdown --json results.json

Options: ``--reps N`` (default: 300 for tiny, 60 for gpt2-small; about 2.3 minutes
in all on 2 CPU cores), ``--warmup N`` untimed repetitions first (default 3),
``--threads N`` (``torch.set_num_threads``, default 1 for stable timings),
``--model-dir`` (build the models there and reuse them across runs; default a temporary
directory, removed at the end). The nnsight columns are left out, with a message, when
nnsight is not installed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import nnsight_dist as nd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find common.py
import common  # noqa: E402
from common import GENERATE_TOKENS, PROMPT, SCENARIOS, flat, hooks  # noqa: E402

try:  # optional: the comparison column
    import nnsight
except ImportError:  # pragma: no cover - depends on the environment
    nnsight = None

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="llama"),
    "gpt2-small": dict(arch="gpt2", layers=12, hidden=768, heads=12, intermediate=3072, vocab=50257),
}
DEFAULT_REPS = {"tiny": 300, "gpt2-small": 60}

VARIANTS = ("torch", "nnsight_dist", "nnsight")


# ---------------------------------------------------------------------------- models


@dataclass
class Setup:
    """One model size: the three loaded variants and what the scenarios need."""

    size: str
    arch: str
    torch_model: torch.nn.Module
    nd_model: Any
    nn_model: Any
    inputs: Any
    pad_token_id: int
    mid: int

    def layers(self, root: Any) -> Any:
        """The decoder layers of a HF module or of an nnsight(-dist) envoy of it."""
        return root.transformer.h if self.arch == "gpt2" else root.model.layers


def load(size: str, directory: str) -> Setup:
    """Build (or reuse) the model of ``size`` in ``directory`` and load it three times."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    spec = SIZES[size]
    path = nd.testing.make_tiny_model(directory, **spec)
    hf_logging.disable_progress_bar()
    torch_model = AutoModelForCausalLM.from_pretrained(path).eval()
    nd_model = nd.LanguageModel(path)
    nn_model = None
    if nnsight is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
            nn_model = nnsight.LanguageModel(path, dispatch=True)
        nn_model._module.eval()
    tokenizer = nd_model.tokenizer
    inputs = tokenizer(PROMPT, return_tensors="pt")
    setup = Setup(size, spec["arch"], torch_model, nd_model, nn_model, inputs,
                  tokenizer.pad_token_id, 0)
    setup.mid = len(setup.layers(torch_model)) // 2
    return setup


# ---------------------------------------------------------------------------- helpers


def detach(value: Any) -> Any:
    """``value`` with every tensor detached (what a cache stores)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        items = [detach(v) for v in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        mapped = {k: detach(v) for k, v in value.items()}
        return mapped if type(value) is dict else type(value)(**mapped)
    return value


# ---------------------------------------------------------------------------- plain torch
# Each function runs one scenario once and returns what it kept (for the check).


def torch_empty(s: Setup, check: bool = False) -> Any:
    out = s.torch_model(**s.inputs)
    return out.logits if check else None


def torch_one_save(s: Setup, check: bool = False) -> Any:
    kept = {}

    def keep(module, args, output):
        kept["h"] = output

    with hooks([(s.layers(s.torch_model)[s.mid], keep)]):
        s.torch_model(**s.inputs)
    return kept["h"]


def torch_every_layer(s: Setup, check: bool = False) -> Any:
    kept = []

    def keep(module, args, output):
        kept.append(output)

    with hooks([(layer, keep) for layer in s.layers(s.torch_model)]):
        s.torch_model(**s.inputs)
    return kept


def torch_one_edit(s: Setup, check: bool = False) -> Any:
    def edit(module, args, output):
        output[:, -1] = 0

    with hooks([(s.layers(s.torch_model)[s.mid], edit)]):
        out = s.torch_model(**s.inputs)
    return out.logits if check else None


def torch_cache(s: Setup, check: bool = False) -> Any:
    cache = {}

    def recorder(path):
        def record(module, args, output):
            cache[path] = detach(output)

        return record

    pairs = [(m, recorder(f"model.{name}" if name else "model"))
             for name, m in s.torch_model.named_modules()]
    with hooks(pairs):
        s.torch_model(**s.inputs)
    return cache


def torch_generate(s: Setup, check: bool = False) -> Any:
    steps = []

    def read(module, args, output):
        steps.append(output[:, -1].argmax(-1))

    with hooks([(s.torch_model.lm_head, read)]):
        tokens = s.torch_model.generate(**s.inputs, max_new_tokens=GENERATE_TOKENS,
                                        do_sample=False, pad_token_id=s.pad_token_id)
    return steps, tokens


# ---------------------------------------------------------------------------- nnsight_dist
# (A body of only `pass` is not used: see docs/performance.md.)


def nd_empty(s: Setup, check: bool = False) -> Any:
    model = s.nd_model
    logits = None
    with model.trace(s.inputs):
        if check:
            logits = nd.save(model.lm_head.output)
    return logits


def nd_one_save(s: Setup, check: bool = False) -> Any:
    model, layers = s.nd_model, s.layers(s.nd_model)
    with model.trace(s.inputs):
        h = nd.save(layers[s.mid].output)
    return h


def nd_every_layer(s: Setup, check: bool = False) -> Any:
    model, layers = s.nd_model, s.layers(s.nd_model)
    with model.trace(s.inputs):
        kept = nd.save([])
        for layer in layers:
            kept.append(layer.output)
    return kept


def nd_one_edit(s: Setup, check: bool = False) -> Any:
    model, layers = s.nd_model, s.layers(s.nd_model)
    logits = None
    with model.trace(s.inputs):
        layers[s.mid].output[:, -1] = 0
        if check:
            logits = nd.save(model.lm_head.output)
    return logits


def nd_cache(s: Setup, check: bool = False) -> Any:
    model = s.nd_model
    with model.trace(s.inputs) as tracer:
        cache = tracer.cache()
    return {path: entry.output for path, entry in cache.items()}


def nd_generate(s: Setup, check: bool = False) -> Any:
    model = s.nd_model
    with model.generate(s.inputs, max_new_tokens=GENERATE_TOKENS, do_sample=False) as tracer:
        steps = nd.save([])
        for step in tracer.iter[:GENERATE_TOKENS]:
            steps.append(model.lm_head.output[:, -1].argmax(-1))
        tokens = nd.save(tracer.result)
    return steps, tokens


# ---------------------------------------------------------------------------- nnsight


def nn_empty(s: Setup, check: bool = False) -> Any:
    model = s.nn_model
    logits = None
    with model.trace(s.inputs):
        if check:
            logits = nnsight.save(model.lm_head.output)
    return logits


def nn_one_save(s: Setup, check: bool = False) -> Any:
    model, layers = s.nn_model, s.layers(s.nn_model)
    with model.trace(s.inputs):
        h = nnsight.save(layers[s.mid].output)
    return h


def nn_every_layer(s: Setup, check: bool = False) -> Any:
    model, layers = s.nn_model, s.layers(s.nn_model)
    with model.trace(s.inputs):
        kept = nnsight.save([])
        for layer in layers:
            kept.append(layer.output)
    return kept


def nn_one_edit(s: Setup, check: bool = False) -> Any:
    model, layers = s.nn_model, s.layers(s.nn_model)
    logits = None
    with model.trace(s.inputs):
        layers[s.mid].output[:, -1] = 0
        if check:
            logits = nnsight.save(model.lm_head.output)
    return logits


def nn_cache(s: Setup, check: bool = False) -> Any:
    model = s.nn_model
    with model.trace(s.inputs) as tracer:
        cache = tracer.cache()
    return {path: cache[path].output for path in cache.keys()}


def nn_generate(s: Setup, check: bool = False) -> Any:
    model = s.nn_model
    with model.generate(s.inputs, max_new_tokens=GENERATE_TOKENS, do_sample=False) as tracer:
        steps = nnsight.save([])
        for step in tracer.iter[:GENERATE_TOKENS]:
            steps.append(model.lm_head.output[:, -1].argmax(-1))
        tokens = nnsight.save(tracer.result)
    return steps, tokens


RUNNERS: dict[str, dict[str, Callable[[Setup, bool], Any]]] = {
    "torch": {name: globals()[f"torch_{name}"] for name in SCENARIOS},
    "nnsight_dist": {name: globals()[f"nd_{name}"] for name in SCENARIOS},
    "nnsight": {name: globals()[f"nn_{name}"] for name in SCENARIOS},
}


# ---------------------------------------------------------------------------- check


def verify(s: Setup, scenarios: list[str], variants: list[str]) -> None:
    """Run every scenario once per variant (with the check read) and compare the values."""
    for name in scenarios:
        reference = RUNNERS["torch"][name](s, True)
        if not flat(reference):
            raise SystemExit(f"check of {name} ({s.size}): the torch variant kept nothing")
        for variant in variants[1:]:
            problem = common.same(reference, RUNNERS[variant][name](s, True))
            if problem:
                raise SystemExit(f"check of {name} ({s.size}): {variant} differs from torch: {problem}")


# ---------------------------------------------------------------------------- timing


def measure(s: Setup, scenarios: list[str], variants: list[str], reps: int, warmup: int,
            progress: bool) -> common.Times:
    """Times in seconds, ``[scenario][variant] -> one per repetition`` (rotating order)."""
    return common.measure_rotating(lambda v, name: RUNNERS[v][name](s), scenarios, variants, reps,
                                   warmup, f"{s.size}", progress)


@dataclass
class Row:
    scenario: str
    size: str
    reps: int
    median_ms: dict[str, float]
    overhead_ms: dict[str, float]  # median of paired (variant - torch) differences
    overhead_se_ms: dict[str, float]  # its standard error (from the MAD)

    def ratio(self, a: str, b: str) -> Optional[float]:
        if a not in self.median_ms or b not in self.median_ms:
            return None
        return self.median_ms[a] / self.median_ms[b]


def summarize(size: str, times: common.Times) -> list[Row]:
    rows = []
    for name, per in times.items():
        base = per["torch"]
        med = {v: common.median_ms(ts) for v, ts in per.items()}
        over, se = {}, {}
        for v, ts in per.items():
            if v != "torch":
                over[v], se[v] = common.paired(ts, base)
        rows.append(Row(name, size, len(base), med, over, se))
    return rows


def _pm(over: dict[str, float], se: dict[str, float], v: str) -> str:
    return "n/a" if v not in over else common.pm(over[v], se[v])


HEADER = ("scenario", "size", "torch ms", "nd ms", "nnsight ms", "nd +ms", "nnsight +ms",
          "nd/torch", "nnsight/torch", "nd/nnsight")


def cells(row: Row) -> list[str]:
    m, o, f = row.median_ms, row.overhead_ms, common.fmt
    return [row.scenario, row.size, f(m.get("torch")), f(m.get("nnsight_dist")),
            f(m.get("nnsight")), _pm(o, row.overhead_se_ms, "nnsight_dist"),
            _pm(o, row.overhead_se_ms, "nnsight"), f(row.ratio("nnsight_dist", "torch")),
            f(row.ratio("nnsight", "torch")), f(row.ratio("nnsight_dist", "nnsight"))]


def table(rows: list[Row], markdown: bool) -> str:
    return common.render(HEADER, [cells(r) for r in rows], markdown, left=2)


# ---------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per size (default: " +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_REPS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--sizes", type=common.choices(tuple(SIZES), "size"),
                        default=list(SIZES), help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--scenarios", type=common.choices(SCENARIOS, "scenario"),
                        default=list(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--model-dir", default=None,
                        help="build the models in DIR/<size> and reuse them (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", metavar="PATH", help="also write the raw times and summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.warmup < 0 or args.threads < 1:
        parser.error("--warmup must be >= 0 and --threads >= 1")

    torch.set_num_threads(args.threads)
    variants = list(VARIANTS)
    if nnsight is None:
        print("nnsight is not installed: the nnsight columns are left out (n/a).", file=sys.stderr)
        variants.remove("nnsight")
    versions = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "nnsight_dist": nd.__version__,
        "nnsight": getattr(nnsight, "__version__", None), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), file=sys.stderr)

    rows: list[Row] = []
    raw: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        root = args.model_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="nd_overhead_"))
        for size in args.sizes:
            t0 = time.perf_counter()
            s = load(size, os.path.join(root, size))
            reps = args.reps if args.reps is not None else DEFAULT_REPS[size]
            verify(s, args.scenarios, variants)
            print(f"{size}: built/loaded and checked in {time.perf_counter() - t0:.1f}s "
                  f"({sum(p.numel() for p in s.torch_model.parameters()) / 1e6:.1f}M parameters, "
                  f"{s.inputs['input_ids'].shape[1]} prompt tokens); all variants agree",
                  file=sys.stderr)
            times = measure(s, args.scenarios, variants, reps, args.warmup, not args.no_progress)
            rows += summarize(size, times)
            raw[size] = times
            del s

    order = {name: i for i, name in enumerate(SCENARIOS)}
    rows.sort(key=lambda r: (order[r.scenario], args.sizes.index(r.size)))
    print()
    print(table(rows, args.markdown))
    print("\nms: median time per trace; +ms: median over repetitions of (variant - torch) in the "
          "same repetition, ± its standard error; ratios: of the medians.")
    if args.json:
        common.write_json(args.json, {"versions": versions, "args": vars(args),
                                      "rows": [r.__dict__ for r in rows], "times_s": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
