"""Per-trace cost of nnsight_dist on a model sharded over ranks (tp or pp), side by side.

What is measured
----------------
The wall-clock time, on rank 0, of one complete trace of a tiny Llama
(``nd.testing.make_tiny_model(dir, arch="llama")``: 4 layers, hidden 128, 0.8M parameters,
built by rank 0 while the other ranks wait in ``nd.broadcast_object``) loaded with
``nd.LanguageModel(dir, tp=, pp=)``. Every rank runs the same sequence of runs (the
traces are collective), rank 0 reads its clock and prints. Variants:

* ``--tp N`` (``pp=1``):

  - ``untraced``: the same sharded module called without a trace,
    ``model._module(**batch)`` under ``torch.no_grad()`` (``model._module.generate(...)``
    for ``generate``). This is the floor: the engine's own all-reduces, no interventions.
  - ``nnsight_dist``: ``with model.trace(batch): ...`` on the same model object.
  - ``nnsight``: nnsight 0.8.1, ``nnsight.LanguageModel(dir, dispatch=True,
    distributed_config=DistributedConfig(tp_size=N))`` (imported after nnsight_dist),
    traced under ``torch.no_grad()`` (nnsight_dist's sharded forward and the untraced
    baseline run without autograd too). nnsight 0.8.1 reads transformers' tensor-parallel
    matcher as ``transformers.distributed.tensor_parallel._get_parameter_plan``, which
    transformers 5.23 moved to ``transformers.distributed.parallel_utils``; without an
    alias the load fails with ``ImportError`` and there is no nnsight column at all. This
    script installs the alias (the same function under its old name; ``--no-nnsight-shim``
    leaves it out and reports the failure). Scenarios nnsight cannot run are ``n/a`` with
    the error.

* ``--pp N`` (``tp=1``): an untraced forward of a pipeline-sharded model is *not a
  forward*: nnsight_dist moves the hidden states and the logits between stages in the
  call points' ``before``/``after`` hooks, which act only while a trace runs, so untraced
  each stage computes its own layers on placeholder input and nothing crosses stages.
  The baseline is therefore an **empty trace** (``empty_trace``: a trace, or a
  ``generate`` trace for ``generate``, whose body intervenes nowhere); it includes the
  stage-to-stage transfers and nnsight_dist's fixed per-trace cost. As a floor the table
  also gives ``p2p``: the same untraced sharded module made into a pipeline by hand, with
  plain forward hooks doing blocking ``torch.distributed`` sends and receives (hidden
  states at the stage boundary, logits from the last stage to the others) on a group of
  their own; no nnsight_dist code runs (its logits and generated tokens are checked
  against the reference too). nnsight 0.8.1 has no pipeline parallelism: no nnsight column.

Scenarios (``--scenarios``), as in ``benchmarks/overhead.py`` (``mid`` = layer 2):
``empty`` (no intervention), ``one_save`` (save ``layers[mid].output``), ``every_layer``
(save every layer's output), ``one_edit`` (``layers[mid].output[:, -1] = 0``), ``cache``
(``tracer.cache()``), ``generate`` (``generate(max_new_tokens=3, do_sample=False)``, read
``lm_head.output[:, -1].argmax(-1)`` in ``for step in tracer.iter[:3]``, save
``tracer.result``). The input is the tokenized prompt (``input_ids``, ``attention_mask``;
19 tokens), so tokenization is not timed. Saves use ``nd.save``/``nnsight.save``.

Check before timing: every scenario runs once per traced variant with a check read (the
final logits where the body saves nothing), and every rank compares what it got with a
single-process reference (the same checkpoint loaded plainly, hooks doing the same
thing): shapes must match and values must be ``allclose(atol=1e-5)``. A mismatch (say,
a value that is one rank's fragment: the message names it and its whole shape) is
reported on stderr and under the table, the scenario is marked ``*`` and still timed. A
run that raises is ``n/a`` with its error (for nnsight's ``cache``, a cache of every
module but ``embed_tokens`` is then checked, to say which part fails).

Traffic. For each nnsight_dist scenario one more run of the timed body (no check read)
records, summed over the ranks, what the router sent in the trace
(``model.interleaver.seam.router.traffic``: kind -> [messages, payload bytes]; kinds
``v`` served values, ``o`` observed (cache) values, ``h`` hidden states, ``logits``,
``p`` attributes) and how many tensor-parallel gathers (all-gather / all-reduce of a
fragmented location, ``TensorCodec._gather``) ran with how many bytes, and compares
them with the minimum:

* interventions: one message per served value of a stage-owned location, to each other
  stage (``(pp-1) * tp`` messages, each the whole value) -- the distinct requests of the
  scenario: 0, 1, 4, 1, every stage-owned module output, 3 (one ``lm_head`` read per step);
* engine: one hidden-state message per stage boundary per step, and the logits to each
  other stage per step (``(pp-1) * tp * steps`` each);
* tp gathers: one per rank per read of a fragmented value. Which module outputs are
  fragments is found independently of nnsight_dist: an untraced forward of the sharded
  model with plain forward hooks, shapes compared with the reference (under transformers'
  llama plan: ``q/k/v/gate/up_proj`` and ``mlp.act_fn``; decoder-layer outputs and
  ``lm_head`` are whole).

Statistics: each repetition runs, for every scenario, the variants once each in rotating
order; the table gives medians (ms), ratios of medians, and the median over repetitions
of the paired difference ``nnsight_dist - baseline`` with its standard error
(``1.25 * 1.48 * MAD / sqrt(n)``).

Running
-------
::

    launch/torchrun.sh 2 benchmarks/distributed.py --tp 2
    launch/torchrun.sh 2 benchmarks/distributed.py --pp 2
    launch/mpirun.sh 2 benchmarks/distributed.py --tp 2 --markdown
    launch/torchrun.sh 2 benchmarks/distributed.py --pp 2 --scenarios empty,cache --reps 50 --profile 30

Options: ``--reps N`` (default 170 at tp, 300 at pp: 55-80 s per run on 2 CPU
cores), ``--warmup N`` (default 3), ``--scenarios a,b``, ``--model-dir DIR`` (build the
model there and reuse it; default a temporary directory), ``--markdown``, ``--json PATH``
(raw times, traffic), ``--no-nnsight``, ``--no-nnsight-shim``, ``--profile N`` (after
timing, cProfile N more nnsight_dist traces of each scenario on rank 0 and print where
the time goes), ``--micro`` (after timing, measure the pieces: the end-of-trace
exchanges, one tp gather, router messages against plain send/recv; see ``micro``),
``--no-progress``. World size must equal ``tp * pp`` (one replica).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

import nnsight_dist as nd
from nnsight_dist.distributed import placement as nd_placement
from nnsight_dist.distributed import replica as nd_replica

PROMPT = "The Eiffel Tower is in the city of"
SCENARIOS = ("empty", "one_save", "every_layer", "one_edit", "cache", "generate")
GENERATE_TOKENS = 3
DEFAULT_REPS = {"tp": 170, "pp": 300}


# ---------------------------------------------------------------------------- helpers


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
    return sum(t.numel() * t.element_size() for t in flat(value))


def same(ref: Any, got: Any) -> Optional[str]:
    """``None`` when ``got`` holds the tensors of ``ref`` (shapes equal, values close)."""
    if type(ref) is dict and type(got) is dict:  # a cache: path -> output
        if set(ref) != set(got):
            return f"keys differ: {sorted(set(ref) ^ set(got))[:5]}"
        problems = [f"{key}: {p}" for key in ref for p in [same(ref[key], got[key])] if p]
        if not problems:
            return None
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return f"{len(problems)} of {len(ref)} entries differ: " + "; ".join(problems[:3]) + more
    ta, tb = flat(ref), flat(got)
    if len(ta) != len(tb):
        return f"{len(ta)} tensors vs {len(tb)}"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return f"shape {tuple(y.shape)}, whole value {tuple(x.shape)} (a fragment?)"
        if not torch.equal(x, y) and not torch.allclose(x.float(), y.float(), atol=1e-5, rtol=1e-5):
            return f"values differ (max |diff| {(x.float() - y.float()).abs().max().item():.3g})"
    return None


@contextlib.contextmanager
def hooks(pairs: list[tuple[torch.nn.Module, Callable]]):
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def median_se(values: list[float]) -> float:
    """Standard error of the median, from the median absolute deviation (robust)."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    return 1.2533 * 1.4826 * mad / max(len(values), 1) ** 0.5


def say(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    topo: Any
    mode: str  # "tp" or "pp"
    nd_model: Any
    nn_model: Any
    nn_error: Optional[str]
    ref_model: torch.nn.Module
    batch: Any
    pad: int
    mid: int
    n_layers: int
    p2p_group: Any = None  # pp: the process group of the hand-made pipeline
    nn_broken: dict[str, str] = field(default_factory=dict)  # scenario -> nnsight's error
    engine_min: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # see engine_minimum
    fragmented: set[str] = field(default_factory=set)  # see fragmented_outputs


def load_nnsight(path: str, tp: int, shim: bool) -> tuple[Any, Optional[str]]:
    """nnsight 0.8.1's tensor-parallel model, or (None, why not)."""
    try:
        import transformers.distributed.tensor_parallel as hf_tp
        if shim and not hasattr(hf_tp, "_get_parameter_plan"):
            from transformers.distributed import parallel_utils

            hf_tp._get_parameter_plan = parallel_utils._get_parameter_plan
        import nnsight
        from transformers.distributed import DistributedConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
            model = nnsight.LanguageModel(path, dispatch=True, distributed_config=DistributedConfig(tp_size=tp))
        model._module.eval()
        return model, None
    except Exception as e:  # reported in the table
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def setup(args: argparse.Namespace, topo: Any, root: str) -> Setup:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = os.path.join(root, "llama")
    if topo.rank == 0:
        nd.testing.make_tiny_model(path, arch="llama")
    path = nd.broadcast_object(path)  # the others wait until rank 0 has written it
    hf_logging.disable_progress_bar()
    nd_model = nd.LanguageModel(path, tp=args.tp, pp=args.pp)
    mode = "tp" if args.pp == 1 else "pp"
    nn_model, nn_error = None, "nnsight has no pipeline parallelism" if mode == "pp" else None
    if mode == "tp" and not args.no_nnsight:
        nn_model, nn_error = load_nnsight(path, args.tp, not args.no_nnsight_shim)
        errors = nd.gather_object(nn_error)  # every rank must have it, or nobody runs it
        first = next((e for e in errors if e), None) if topo.rank == 0 else None
        nn_error = nd.broadcast_object(first)
        if nn_error is not None:
            nn_model = None
            if topo.rank == 0:
                say(f"nnsight at tp={args.tp} cannot load: {nn_error}")
    elif args.no_nnsight:
        nn_error = "left out (--no-nnsight)"
    group = None
    if mode == "pp":
        import torch.distributed as dist

        group = dist.new_group(topo.replica_ranks(), backend="gloo")  # the hand-made pipeline's own
    ref = AutoModelForCausalLM.from_pretrained(path).eval()  # single-process reference
    batch = nd_model.tokenizer(PROMPT, return_tensors="pt")
    n_layers = nd_model.config.num_hidden_layers
    return Setup(topo, mode, nd_model, nn_model, nn_error, ref, batch, nd_model.tokenizer.pad_token_id,
                 n_layers // 2, n_layers, group)


# ---------------------------------------------------------------------------- reference
# The single-process model with hooks: what each scenario must give (checks), and the
# whole values a minimal router would send (traffic minimum).


def reference(s: Setup, name: str) -> tuple[Any, list[tuple[str, Any]]]:
    """(expected check value, [(module path, whole value read)] for the minimum)."""
    m = s.ref_model
    layers = m.model.layers
    mods = {f"model.{n}" if n else "model": mod for n, mod in m.named_modules()}
    with torch.no_grad():
        if name == "empty":
            return m(**s.batch).logits, []
        if name in ("one_save", "every_layer"):
            kept = []
            picked = [s.mid] if name == "one_save" else list(range(s.n_layers))
            with hooks([(layers[i], lambda mod, a, o: kept.append(o)) for i in picked]):
                m(**s.batch)
            reads = [(f"model.model.layers.{i}", v) for i, v in zip(picked, kept)]
            return (kept[0] if name == "one_save" else kept), reads
        if name == "one_edit":
            read = []

            def edit(mod, a, o):
                read.append(o.clone())
                o[:, -1] = 0

            with hooks([(layers[s.mid], edit)]):
                logits = m(**s.batch).logits
            return logits, [(f"model.model.layers.{s.mid}", read[0])]
        if name == "cache":
            cache: dict[str, Any] = {}

            def recorder(path):
                return lambda mod, a, o: cache.__setitem__(path, o)

            with hooks([(mod, recorder(p)) for p, mod in mods.items()]):
                m(**s.batch)
            return cache, list(cache.items())
        if name == "generate":
            steps = []
            with hooks([(m.lm_head, lambda mod, a, o: steps.append(o))]):
                tokens = m.generate(**s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=s.pad)
            return ([o[:, -1].argmax(-1) for o in steps], tokens), [("model.lm_head", o) for o in steps]
    raise KeyError(name)


def engine_minimum(s: Setup) -> dict[str, list[int]]:
    """Stage-to-stage transfers a pipeline needs per trace: kind -> [messages, bytes], with
    per-step sizes from the reference (hidden states at each boundary, logits)."""
    if s.topo.pp == 1:
        return {}
    from nnsight_dist.engines.transformers import layer_range

    pp, tp = s.topo.pp, s.topo.tp
    m = s.ref_model
    out: dict[str, dict[str, list[int]]] = {}
    for name, gen in (("forward", False), ("generate", True)):
        bounds = [layer_range(st, pp, s.n_layers)[1] - 1 for st in range(pp - 1)]
        hidden: list[int] = []
        logits: list[int] = []
        pairs = [(m.model.layers[b], lambda mod, a, o: hidden.append(nbytes(o))) for b in bounds]
        pairs.append((m.lm_head, lambda mod, a, o: logits.append(nbytes(o))))
        with torch.no_grad(), hooks(pairs):
            if gen:
                m.generate(**s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=s.pad)
            else:
                m(**s.batch)
        out[name] = {"h": [len(hidden) * tp, sum(hidden) * tp],
                     "logits": [len(logits) * (pp - 1) * tp, sum(logits) * (pp - 1) * tp]}
    return out


def minimum(s: Setup, name: str, reads: list[tuple[str, Any]]) -> dict[str, list[int]]:
    """The fewest router messages and bytes the scenario needs, by kind."""
    topo = s.topo
    if topo.pp == 1:
        return {}
    table = s.nd_model.placements()
    receivers = (topo.pp - 1) * topo.tp
    owned = [(table[path].owner_stage, v) for path, v in reads if table[path].owner_stage is not None]
    size = sum(nbytes(v) for _, v in owned) * receivers
    if name == "cache":
        # observed values travel together: one message from each owning rank to each other stage
        senders = len({stage for stage, _ in owned}) * topo.tp
        mins = {"o": [senders * (topo.pp - 1), size]} if owned else {}
    else:
        mins = {"v": [len(owned) * receivers, size]} if owned else {}
    mins.update(s.engine_min["generate" if name == "generate" else "forward"])
    return mins


def fragmented_outputs(s: Setup) -> set[str]:
    """Module paths whose output, as the sharded module returns it on this rank, is not the
    whole value: an untraced forward of the sharded model with plain forward hooks, shapes
    compared with the single-process reference (independent of nnsight_dist's placements)."""
    if s.topo.tp == 1:
        return set()
    shapes: dict[str, list] = {}

    def recorder(store, path):
        return lambda mod, a, o: store.__setitem__(path, [tuple(t.shape) for t in flat(o)])

    local: dict[str, list] = {}
    mods = {f"model.{n}" if n else "model": m for n, m in s.nd_model._module.named_modules()}
    with torch.no_grad(), hooks([(m, recorder(local, p)) for p, m in mods.items()]):
        s.nd_model._module(**s.batch)
    mods = {f"model.{n}" if n else "model": m for n, m in s.ref_model.named_modules()}
    with torch.no_grad(), hooks([(m, recorder(shapes, p)) for p, m in mods.items()]):
        s.ref_model(**s.batch)
    return {p for p in shapes if p in local and local[p] != shapes[p]}


def gather_minimum(s: Setup, name: str, reads: list[tuple[str, Any]]) -> int:
    """Tensor-parallel gathers the scenario needs on one rank: one per read of a fragmented
    output; a cache needs one for all its fragments (nothing waits on them during the run)."""
    fragmented = sum(1 for path, _ in reads if path in s.fragmented)
    return min(fragmented, 1) if name == "cache" else fragmented


# ---------------------------------------------------------------------------- runs
# Each returns what it kept (for the check); `check` adds a read of the final logits
# where the body saves nothing.


def nd_run(s: Setup, name: str, check: bool = False) -> Any:
    model = s.nd_model
    layers = model.model.layers
    if name == "empty":
        logits = None
        with model.trace(s.batch):
            if check:
                logits = nd.save(model.lm_head.output)
        return logits
    if name == "one_save":
        with model.trace(s.batch):
            h = nd.save(layers[s.mid].output)
        return h
    if name == "every_layer":
        with model.trace(s.batch):
            kept = nd.save([])
            for layer in layers:
                kept.append(layer.output)
        return kept
    if name == "one_edit":
        logits = None
        with model.trace(s.batch):
            layers[s.mid].output[:, -1] = 0
            if check:
                logits = nd.save(model.lm_head.output)
        return logits
    if name == "cache":
        with model.trace(s.batch) as tracer:
            cache = tracer.cache()
        return {path: entry.output for path, entry in cache.items()}
    if name == "generate":
        with model.generate(s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False) as tracer:
            steps = nd.save([])
            for step in tracer.iter[:GENERATE_TOKENS]:
                steps.append(model.lm_head.output[:, -1].argmax(-1))
            tokens = nd.save(tracer.result)
        return steps, tokens
    raise KeyError(name)


def nn_run(s: Setup, name: str, check: bool = False) -> Any:
    import nnsight

    model = s.nn_model
    layers = model.model.layers
    with torch.no_grad():
        if name == "empty":
            logits = None
            with model.trace(s.batch):
                if check:
                    logits = nnsight.save(model.lm_head.output)
            return logits
        if name == "one_save":
            with model.trace(s.batch):
                h = nnsight.save(layers[s.mid].output)
            return h
        if name == "every_layer":
            with model.trace(s.batch):
                kept = nnsight.save([])
                for layer in layers:
                    kept.append(layer.output)
            return kept
        if name == "one_edit":
            logits = None
            with model.trace(s.batch):
                layers[s.mid].output[:, -1] = 0
                if check:
                    logits = nnsight.save(model.lm_head.output)
            return logits
        if name == "cache":
            with model.trace(s.batch) as tracer:
                cache = tracer.cache()
            return {path: cache[path].output for path in cache.keys()}
        if name == "cache_but_embedding":  # diagnostic only (not timed): see check_and_count
            modules = [e for e in model.modules() if not e.path.endswith("embed_tokens")]
            with model.trace(s.batch) as tracer:
                cache = tracer.cache(modules=modules)
            return {path: cache[path].output for path in cache.keys()}
        if name == "generate":
            with model.generate(s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False) as tracer:
                steps = nnsight.save([])
                for step in tracer.iter[:GENERATE_TOKENS]:
                    steps.append(model.lm_head.output[:, -1].argmax(-1))
                tokens = nnsight.save(tracer.result)
            return steps, tokens
    raise KeyError(name)


def untraced_run(s: Setup, name: str, check: bool = False) -> Any:
    """The sharded module called without a trace (at pp: see ``p2p_run``)."""
    module = s.nd_model._module
    with torch.no_grad():
        if name == "generate":
            return module.generate(**s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=s.pad)
        return module(**s.batch).logits


@contextlib.contextmanager
def p2p_pipeline(s: Setup):
    """The untraced pipeline forward done by hand: plain forward hooks doing blocking
    ``torch.distributed`` sends and receives on a group of their own (hidden states at each
    stage boundary, logits from the last stage to the others). No nnsight_dist code runs."""
    import torch.distributed as dist
    from nnsight_dist.engines.transformers import layer_range

    topo = s.topo
    module = s.nd_model._module
    layers = module.model.layers
    start, end = layer_range(topo.pp_rank, topo.pp, s.n_layers)
    stage, last = topo.pp_rank, topo.pp - 1
    group = s.p2p_group
    handles = []
    if stage > 0:
        prev = topo.rank_of(stage - 1, topo.tp_rank)

        def receive(mod, args, kwargs):
            hidden = torch.empty_like(args[0])
            dist.recv(hidden, src=prev, group=group)
            return (hidden, *args[1:]), kwargs

        handles.append(layers[start].register_forward_pre_hook(receive, with_kwargs=True))
    if stage < last:
        nxt = topo.rank_of(stage + 1, topo.tp_rank)
        src = topo.rank_of(last, topo.tp_rank)
        vocab = s.nd_model.config.vocab_size
        handles.append(layers[end - 1].register_forward_hook(
            lambda mod, a, out: dist.send(out.contiguous(), dst=nxt, group=group)))

        def logits(mod, a, out):
            got = torch.empty(*out.shape[:-1], vocab, dtype=out.dtype)
            dist.recv(got, src=src, group=group)
            return got

        handles.append(module.lm_head.register_forward_hook(logits))
    else:
        others = [topo.rank_of(st, topo.tp_rank) for st in range(last)]

        def send_logits(mod, a, out):
            for dst in others:
                dist.send(out.contiguous(), dst=dst, group=group)

        handles.append(module.lm_head.register_forward_hook(send_logits))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def p2p_run(s: Setup, name: str, check: bool = False) -> Any:
    """pp: the untraced sharded model with a hand-written blocking p2p pipeline (no trace)."""
    with p2p_pipeline(s):
        return untraced_run(s, name, check)


def empty_trace_run(s: Setup, name: str, check: bool = False) -> Any:
    """pp baseline: a trace (or generate trace) with no intervention."""
    model = s.nd_model
    if name == "generate":
        with model.generate(s.batch, max_new_tokens=GENERATE_TOKENS, do_sample=False):
            if check:
                pass
        return None
    with model.trace(s.batch):
        if check:
            pass
    return None


RUNNERS = {"untraced": untraced_run, "empty_trace": empty_trace_run, "nnsight_dist": nd_run,
           "nnsight": nn_run, "p2p": p2p_run}


# ---------------------------------------------------------------------------- checks and traffic


@contextlib.contextmanager
def count_gathers():
    """Count the tensor-parallel gathers of fragmented locations (and their bytes) meanwhile."""
    cls = nd_placement.TensorCodec
    original = cls._gather
    counts = [0, 0]

    def counted(self, t):
        out = original(self, t)
        if isinstance(t, torch.Tensor):
            counts[0] += 1
            counts[1] += out.numel() * out.element_size()
        return out

    seam = nd_replica.ReplicaSeam
    assemble = seam._assemble_fragments

    def counted_assemble(self):  # a whole-value cache gathers its fragments together at the end
        counts[0] += len({f[3].dtype for f in self._fragments})
        counts[1] += sum(f[3].numel() * f[3].element_size() for f in self._fragments) * self.topo.tp
        return assemble(self)

    cls._gather, seam._assemble_fragments = counted, counted_assemble
    try:
        yield counts
    finally:
        cls._gather, seam._assemble_fragments = original, assemble


def check_and_count(s: Setup, scenarios: list[str], variants: list[str]) -> dict[str, dict]:
    """Run each scenario once per traced variant; compare with the reference on every rank;
    record router traffic and tp gathers (summed over ranks). Returns per-scenario info on rank 0."""
    topo = s.topo
    router = s.nd_model.interleaver.seam.router if topo.distributed else None
    info: dict[str, dict] = {}
    s.engine_min = engine_minimum(s)
    s.fragmented = fragmented_outputs(s)
    for name in scenarios:
        expected, reads = reference(s, name)
        problem = same(expected, nd_run(s, name, True))
        with count_gathers() as gathers:  # traffic of the timed body (no check read)
            nd_run(s, name)
        traffic = {k: list(v) for k, v in (router.traffic if router is not None else {}).items()}
        nn_problem = None
        if "nnsight" in variants:
            try:
                nn_problem = same(expected, nn_run(s, name, True))
            except Exception as e:
                nn_problem = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else '(no message)'}"
                if name == "cache":  # which part fails, and are the other values whole?
                    try:
                        partial = nn_run(s, "cache_but_embedding", True)
                        rest = {k: v for k, v in expected.items() if not k.endswith("embed_tokens")}
                        nn_problem += ("; a cache of every module but embed_tokens runs: "
                                       + (same(rest, partial) or "all values whole and equal"))
                    except Exception as e2:
                        nn_problem += f"; without embed_tokens too: {type(e2).__name__}"
        everyone = nd.gather_object({"problem": problem, "nn": nn_problem, "traffic": traffic,
                                     "gathers": list(gathers)})
        if topo.rank == 0:
            bad = [(r, e["problem"]) for r, e in enumerate(everyone) if e["problem"]]
            total: dict[str, list[int]] = {}
            for e in everyone:
                for k, (n, b) in e["traffic"].items():
                    t = total.setdefault(k, [0, 0])
                    t[0] += n
                    t[1] += b
            nn_issue = next((e["nn"] for e in everyone if e["nn"]), None)
            info[name] = {
                "traffic": total,
                "minimum": minimum(s, name, reads),
                "gathers": [sum(e["gathers"][0] for e in everyone), sum(e["gathers"][1] for e in everyone)],
                "gathers_min": gather_minimum(s, name, reads) * topo.tp,
                "nnsight_check": nn_issue,
                "check": f"rank {bad[0][0]}: {bad[0][1]}" if bad else None,
            }
        if "p2p" in variants and name in ("empty", "generate"):
            got = p2p_run(s, name, True)
            p2p_problem = same(expected if name == "empty" else expected[1], got)
            if p2p_problem:
                raise SystemExit(f"the hand-made p2p pipeline is wrong on rank {topo.rank} ({name}): {p2p_problem}")
        failed = nd.broadcast_object(info[name]["nnsight_check"] if topo.rank == 0 else None)
        if failed and failed.startswith("FAILED"):
            s.nn_broken[name] = failed
    return info


# ---------------------------------------------------------------------------- timing


def measure(s: Setup, scenarios: list[str], variants: list[str], reps: int, warmup: int,
            progress: bool) -> dict[str, dict[str, list[float]]]:
    """Rank 0's times in seconds, ``[scenario][variant] -> one per repetition``."""
    times = {name: {v: [] for v in variants} for name in scenarios}

    def active(v: str, name: str) -> bool:
        return not (v == "nnsight" and name in s.nn_broken)

    for _ in range(warmup):
        for name in scenarios:
            for v in variants:
                if active(v, name):
                    RUNNERS[v](s, name)
    clock = time.perf_counter
    bar = tqdm(range(reps), desc=f"{s.mode}", unit="rep", disable=not progress, file=sys.stderr)
    for rep in bar:
        for name in scenarios:
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:  # rotating order, the same on every rank
                if not active(v, name):
                    continue
                t0 = clock()
                RUNNERS[v](s, name)
                times[name][v].append(clock() - t0)
    return times


def micro(s: Setup, n: int = 100) -> str:
    """Costs of the pieces, measured in place (``--micro``; instruments internals, timing only):

    - the two end-of-trace exchanges of an empty trace (``ReplicaSeam.drain``: the replica
      all-gathers how many router messages each rank sent; ``ReplicaSeam.close``: the
      digest barrier), against a bare blocking all-gather of ``int64[3]``;
    - tp: one gather of a fragmented value inside a ``cache`` trace (``TensorCodec._gather``)
      against a bare blocking all-gather of the same fragment;
    - pp: 56 values of one hidden state's size (what ``cache`` sends) from the last stage
      to stage 0 through the router, against plain blocking send/recv of the same
      tensors and against one send of all of them in one buffer.
    """
    import torch.distributed as dist
    from nnsight_dist.distributed import replica

    topo = s.topo
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    lines = []
    spent: dict[str, list[float]] = {"drain": [], "close": [], "gather": []}

    def timed(key: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key].append(time.perf_counter() - t0)
        return run

    cls = replica.ReplicaSeam
    saved = cls.drain, cls.close, nd_placement.TensorCodec._gather
    cls.drain, cls.close = timed("drain", cls.drain), timed("close", cls.close)
    try:
        for _ in range(n):
            nd_run(s, "empty")
    finally:
        cls.drain, cls.close = saved[0], saved[1]
    group = topo.group("replica")
    small = torch.zeros(3, dtype=torch.long)
    parts = [torch.zeros(3, dtype=torch.long) for _ in topo.replica_ranks()]
    bare = []
    for _ in range(2 * n):
        t0 = time.perf_counter()
        dist.all_gather(parts, small, group=group)
        bare.append(time.perf_counter() - t0)
    lines.append(f"end of an empty trace: drain {med(spent['drain']):.3f} ms + close {med(spent['close']):.3f} ms; "
                 f"a bare blocking all_gather of int64[3] on the replica: {med(bare):.3f} ms")
    hidden = s.nd_model.config.hidden_size
    if topo.tp > 1:
        nd_placement.TensorCodec._gather = timed("gather", saved[2])
        try:
            for _ in range(max(n // 4, 5)):
                nd_run(s, "cache")
        finally:
            nd_placement.TensorCodec._gather = saved[2]
        piece = torch.randn(1, s.batch["input_ids"].shape[1], hidden // topo.tp)
        parts = [torch.empty_like(piece) for _ in range(topo.tp)]
        bare = []
        for _ in range(2 * n):
            t0 = time.perf_counter()
            dist.all_gather(parts, piece, group=topo.group("tp"))
            bare.append(time.perf_counter() - t0)
        lines.append(f"tp gather inside a cache trace: {med(spent['gather']):.3f} ms each (median of "
                     f"{len(spent['gather'])}); a bare blocking all_gather of {tuple(piece.shape)}: {med(bare):.3f} ms")
    if topo.pp > 1:
        router = s.nd_model.interleaver.seam.router  # internal: driven directly, between traces
        count, value = 56, torch.randn(1, s.batch["input_ids"].shape[1], hidden)
        src, dst = topo.rank_of(topo.pp - 1, topo.tp_rank), topo.rank_of(0, topo.tp_rank)
        me = topo.rank

        def routed() -> None:
            router.next_trace()
            if me == src:
                for i in range(count):
                    router.send(dst, ("o", 0, i), value)
                router.complete_sends()
            elif me == dst:
                for i in range(count):
                    router.wait(("o", 0, i), "a value", src)
            dist.barrier(group=s.p2p_group)

        def plain() -> None:
            if me == src:
                for _ in range(count):
                    dist.send(value, dst=dst, group=s.p2p_group)
            elif me == dst:
                got = torch.empty_like(value)
                for _ in range(count):
                    dist.recv(got, src=src, group=s.p2p_group)
            dist.barrier(group=s.p2p_group)

        def one() -> None:
            if me == src:
                dist.send(value.repeat(count, 1, 1), dst=dst, group=s.p2p_group)
            elif me == dst:
                dist.recv(torch.empty(count, *value.shape[1:]), src=src, group=s.p2p_group)
            dist.barrier(group=s.p2p_group)

        res = {}
        for name, fn in (("router", routed), ("plain", plain), ("one", one)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(max(n // 4, 5)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[name] = med(ts)
        kib = value.numel() * value.element_size() / 1024
        lines.append(f"{count} values of {kib:.1f} KiB, stage {topo.pp - 1} -> stage 0: router {res['router']:.2f} ms "
                     f"({res['router'] / count:.3f} ms per message); plain blocking send/recv {res['plain']:.2f} ms "
                     f"({res['plain'] / count:.3f} ms per message); all in one buffer {res['one']:.2f} ms")
    return "\n".join(lines)


def profile(s: Setup, scenarios: list[str], n: int) -> str:
    """cProfile ``n`` nnsight_dist traces per scenario on rank 0 (every rank runs them)."""
    out = io.StringIO()
    for name in scenarios:
        prof = cProfile.Profile() if s.topo.rank == 0 else None
        for _ in range(2):
            nd_run(s, name)
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        for _ in range(n):
            nd_run(s, name)
        wall = (time.perf_counter() - t0) / n * 1e3
        if prof is None:
            continue
        prof.disable()
        st = pstats.Stats(prof)
        own = sum(v[2] for k, v in st.stats.items() if "nnsight_dist" in k[0]) / n * 1e3
        out.write(f"\n## profile: {name} ({n} traces, {wall:.2f} ms per trace under the profiler; "
                  f"own time in nnsight_dist {own:.2f} ms per trace)\n")
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
            short = file.split("site-packages/")[-1].split("/work/main/")[-1]
            rows.append((ct / n * 1e3, tt / n * 1e3, nc / n, f"{short}:{line} {fn}"))
        out.write("cum ms   own ms   calls  function (by cumulative time)\n")
        for ct, tt, nc, where in sorted(rows, reverse=True)[:28]:
            out.write(f"{ct:7.3f}  {tt:7.3f}  {nc:6.1f}  {where}\n")
        out.write("-- by own time --\n")
        for ct, tt, nc, where in sorted(rows, key=lambda r: -r[1])[:14]:
            out.write(f"{ct:7.3f}  {tt:7.3f}  {nc:6.1f}  {where}\n")
    return out.getvalue()


# ---------------------------------------------------------------------------- report


def traffic_cell(actual: dict[str, list[int]], mins: dict[str, list[int]]) -> tuple[str, str, str]:
    """(messages "a / min", bytes "a / min", verdict)."""
    an = sum(v[0] for v in actual.values())
    ab = sum(v[1] for v in actual.values())
    mn = sum(v[0] for v in mins.values())
    mb = sum(v[1] for v in mins.values())
    kinds = sorted(set(actual) | set(mins))
    extra = [k for k in kinds if actual.get(k, [0, 0]) != mins.get(k, [0, 0])]
    verdict = "= min" if not extra else "differs: " + ", ".join(
        f"{k} {actual.get(k, [0, 0])[0]}/{mins.get(k, [0, 0])[0]} msgs" for k in extra)
    return f"{an} / {mn}", f"{ab / 1024:.1f} / {mb / 1024:.1f}", verdict


def kinds_cell(actual: dict[str, list[int]]) -> str:
    order = ["v", "o", "p", "h", "logits"]
    keys = sorted(actual, key=lambda k: order.index(k) if k in order else 99)
    return " ".join(f"{k}:{actual[k][0]}" for k in keys) or "-"


def paired(per: dict[str, list[float]], v: str, base: str) -> str:
    """Median of the paired differences ``v - base`` (ms) ± its standard error."""
    if not per.get(v):
        return "n/a"
    diffs = [(a - b) * 1e3 for a, b in zip(per[v], per[base])]
    return f"{statistics.median(diffs):+.2f}±{median_se(diffs):.2f}"


def rows_for(s: Setup, times: dict, info: dict, variants: list[str]) -> tuple[list[str], list[list[str]]]:
    base = "untraced" if s.mode == "tp" else "empty_trace"
    header = ["scenario", f"{base} ms", "nd ms"]
    if s.mode == "tp":
        header += ["nnsight ms", "nd/untraced", "nnsight/untraced", "nd/nnsight", "nd +ms", "nnsight +ms",
                   "tp gathers (min)", "gathered KiB"]
    else:
        header += ["p2p ms", "nd/empty", "nd/p2p", "nd +ms", "router msgs (min)", "router KiB (min)", "by kind",
                   "vs min"]
    body = []
    for name, per in times.items():
        med = {v: statistics.median(ts) * 1e3 for v, ts in per.items() if ts}
        over = lambda v: paired(per, v, base)  # noqa: E731
        f = lambda v: f"{med[v]:.2f}" if v in med else "n/a"  # noqa: E731
        r = lambda a, b: f"{med[a] / med[b]:.2f}" if a in med and b in med else "n/a"  # noqa: E731
        i = info.get(name, {})
        row = [name + (" *" if i.get("check") else ""), f(base), f("nnsight_dist")]
        if s.mode == "tp":
            g = i.get("gathers", [0, 0])
            row += [f("nnsight"), r("nnsight_dist", base), r("nnsight", base), r("nnsight_dist", "nnsight"),
                    over("nnsight_dist"), over("nnsight"), f"{g[0]} ({i.get('gathers_min', 0)})", f"{g[1] / 1024:.1f}"]
        else:
            msgs, kib, verdict = traffic_cell(i.get("traffic", {}), i.get("minimum", {}))
            row += [f("p2p"), r("nnsight_dist", base), r("nnsight_dist", "p2p"), over("nnsight_dist"), msgs, kib,
                    kinds_cell(i.get("traffic", {})), verdict]
        body.append(row)
    return header, body


def render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


# ---------------------------------------------------------------------------- main


def _list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in SCENARIOS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown scenario {bad}; choose from {', '.join(SCENARIOS)}")
    return items


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed repetitions (default {DEFAULT_REPS['tp']} at tp, {DEFAULT_REPS['pp']} at pp)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--scenarios", type=_list, default=list(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--model-dir", default=None, help="build the model in DIR/llama and reuse it (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--json", metavar="PATH", help="also write raw times and traffic as JSON (rank 0)")
    parser.add_argument("--no-nnsight", action="store_true", help="leave the nnsight column out")
    parser.add_argument("--no-nnsight-shim", action="store_true",
                        help="do not alias transformers' moved _get_parameter_plan for nnsight 0.8.1")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, cProfile N nnsight_dist traces per scenario on rank 0")
    parser.add_argument("--micro", action="store_true",
                        help="after timing, measure the pieces: end-of-trace exchanges, one tp gather, router messages")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if (args.tp > 1) == (args.pp > 1):
        parser.error("give exactly one of --tp N or --pp N (N > 1)")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    topo = nd.init(tp=args.tp, pp=args.pp)
    if topo.dp != 1:
        raise SystemExit(f"run this on exactly tp*pp = {args.tp * args.pp} ranks (got {topo.world_size})")
    tmp = None
    root = args.model_dir
    if root is None:  # rank 0 makes a temporary directory; the others use its name
        tmp = nd.broadcast_object(tempfile.mkdtemp(prefix="nd_distributed_") if topo.rank == 0 else None)
        root = tmp
    try:
        s = setup(args, topo, root)
        rank0 = s.topo.rank == 0
        if s.mode == "tp":
            variants = ["untraced", "nnsight_dist"] + (["nnsight"] if s.nn_model is not None else [])
        else:
            variants = ["empty_trace", "nnsight_dist", "p2p"]
        info = check_and_count(s, args.scenarios, variants)
        if rank0:
            say(f"loaded and checked in {time.perf_counter() - t0:.1f}s: {s.topo} "
                f"({s.batch['input_ids'].shape[1]} prompt tokens); nnsight_dist was compared with the "
                "single-process reference on every rank, except where said below")
            for name, i in info.items():
                if i["check"]:
                    say(f"  CHECK FAILED: nnsight_dist, {name}: {i['check']}")
                if i["nnsight_check"]:
                    say(f"  nnsight, {name}: {i['nnsight_check']}")
        reps = args.reps if args.reps is not None else DEFAULT_REPS[s.mode]
        times = measure(s, args.scenarios, variants, reps, args.warmup, rank0 and not args.no_progress)
        prof = profile(s, args.scenarios, args.profile) if args.profile else ""
        parts = micro(s) if args.micro else ""
        if rank0:
            import transformers

            nn_version = None
            with contextlib.suppress(Exception):
                import importlib.metadata as md

                nn_version = md.version("nnsight")
            print(f"\n{s.mode}={getattr(args, s.mode)}: world {s.topo.world_size} ({s.topo.launcher}), "
                  f"{reps} repetitions, rank 0's clock; python {platform.python_version()}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, nnsight_dist {nd.__version__} "
                  f"({os.path.dirname(os.path.dirname(nd.__file__))}), nnsight {nn_version}, "
                  f"{os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f}s in all")
            header, body = rows_for(s, times, info, variants)
            print(render(header, body, args.markdown))
            if s.mode == "tp":
                print("\nms: median per run; +ms: median of paired (variant - untraced) ± its standard "
                      "error; tp gathers: all-gathers/all-reduces of fragmented locations summed over ranks "
                      "(minimum: one per read fragmented value per rank). The router has no peers at pp=1.")
                if s.nn_model is None:
                    print(f"nnsight: not run ({s.nn_error})")
                for name, i in info.items():
                    if i["nnsight_check"]:
                        print(f"nnsight, {name}: {i['nnsight_check']}")
            else:
                print("\nms: median per run; empty_trace: a trace whose body intervenes nowhere (the baseline at pp); "
                      "p2p: the untraced model with a hand-written blocking torch.distributed pipeline (forward "
                      "hooks sending hidden states and logits; no nnsight_dist code); "
                      "nd +ms: median of paired (nnsight_dist - empty_trace) ± its standard error; router: "
                      "messages and payload KiB sent in the trace, summed over ranks, against the minimum; by kind: "
                      "v served values, o observed (cache) values, p attributes, h hidden states, logits.")
            for name, i in info.items():
                if i["check"]:
                    print(f"* CHECK FAILED, nnsight_dist, {name}, {i['check']}")
            if parts:
                print("\nmicro-measurements (rank 0, medians):\n" + parts)
            if prof:
                print(prof)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "variants": variants, "times_s": times, "info": info}, f, indent=1)
    except BaseException:
        if tmp is not None and topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        nd.broadcast_object(0)  # everyone is done with the files
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
