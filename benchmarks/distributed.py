"""Per-trace cost of nnsight_dist on a model sharded over ranks (tp or pp), side by side.

What is measured
----------------
The wall-clock time, on rank 0, of one complete trace of a tiny Llama
(``nd.testing.make_tiny_model(dir, arch="llama")``: 4 layers, hidden 128, 0.8M parameters,
built by rank 0 while the other ranks wait in ``nd.broadcast_object``) loaded with
``nd.LanguageModel(dir, tp=, pp=, engine=)``. Every rank runs the same sequence of runs (the
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
fragmented location, ``LayoutCodec._gather``) ran with how many bytes, and compares
them with the minimum:

* interventions: one message per served value of a stage-owned location, to each other
  stage (``(pp-1) * tp`` messages, each the whole value) -- the distinct requests of the
  scenario: 0, 1, 4, 1, every stage-owned module output, 3 (one ``lm_head`` read per step)
  -- except to the stages the engine's own messages already take it to, unchanged (a
  stage's last layer output to the next stage, ``lm_head``'s to every other): at pp=2,
  ``every_layer`` needs 3 and ``generate`` none;
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
    launch/torchrun.sh 2 benchmarks/distributed.py --tp 2 --engine deepspeed

Options: ``--engine NAME`` (``transformers``, ``deepspeed`` or ``torch``: the engine that
shards ``nnsight_dist``'s model and the ``untraced`` baseline; nnsight 0.8.1 always loads
through transformers), ``--reps N`` (default 170 at tp, 300 at pp: 55-80 s per run on 2 CPU
cores), ``--warmup N`` (default 3), ``--scenarios a,b``, ``--model-dir DIR`` (build the
model there and reuse it; default a temporary directory), ``--markdown``, ``--json PATH``
(raw times, traffic), ``--no-nnsight``, ``--no-nnsight-shim``, ``--profile N`` (after
timing, cProfile N more nnsight_dist traces of each scenario on rank 0 and print where
the time goes), ``--micro`` (after timing, measure the pieces: the end-of-trace
exchanges, one tp gather, router messages against plain send/recv; see
``distributed_diagnostics.micro``),
``--no-progress``. World size must equal ``tp * pp`` (one replica).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import nnsight_dist as nd
from nnsight_dist import engines

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find common.py
import common  # noqa: E402
import distributed_checks  # noqa: E402
import distributed_diagnostics  # noqa: E402
from common import GENERATE_TOKENS, PROMPT, SCENARIOS, say  # noqa: E402

DEFAULT_REPS = {"tp": 170, "pp": 300}


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
    nd_model = nd.LanguageModel(path, tp=args.tp, pp=args.pp, engine=args.engine)
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


# ---------------------------------------------------------------------------- timing


def measure(s: Setup, scenarios: list[str], variants: list[str], reps: int, warmup: int,
            progress: bool) -> common.Times:
    """Rank 0's times in seconds, ``[scenario][variant] -> one per repetition`` (rotating
    order, the same on every rank; nnsight is left out where it failed the check)."""
    return common.measure_rotating(lambda v, name: RUNNERS[v](s, name), scenarios, variants, reps, warmup,
                                   f"{s.mode}", progress,
                                   active=lambda v, name: not (v == "nnsight" and name in s.nn_broken))


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
    return common.pm(*common.paired(per[v], per[base]))


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
        med = {v: common.median_ms(ts) for v, ts in per.items() if ts}
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


# ---------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--engine", choices=list(engines.MODULES), default="transformers",
                        help="the engine sharding the model (default transformers; see docs/engines.md)")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed repetitions (default {DEFAULT_REPS['tp']} at tp, {DEFAULT_REPS['pp']} at pp)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--scenarios", type=common.choices(SCENARIOS, "scenario"), default=list(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
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
        info = distributed_checks.check_and_count(s, args.scenarios, variants, RUNNERS)
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
        prof = distributed_diagnostics.profile(s, nd_run, args.scenarios, args.profile) if args.profile else ""
        parts = distributed_diagnostics.micro(s, nd_run) if args.micro else ""
        if rank0:
            import transformers

            nn_version = None
            with contextlib.suppress(Exception):
                import importlib.metadata as md

                nn_version = md.version("nnsight")
            print(f"\n{s.mode}={getattr(args, s.mode)}, engine={args.engine}: world {s.topo.world_size} ({s.topo.launcher}), "
                  f"{reps} repetitions, rank 0's clock; python {platform.python_version()}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, nnsight_dist {nd.__version__} "
                  f"({os.path.dirname(os.path.dirname(nd.__file__))}), nnsight {nn_version}, "
                  f"{os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f}s in all")
            header, body = rows_for(s, times, info, variants)
            print(common.render(header, body, args.markdown))
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
                common.write_json(args.json, {"args": vars(args), "variants": variants, "times_s": times, "info": info})
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
