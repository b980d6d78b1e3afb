"""Soak: many traces of a tensor- and pipeline-parallel model, correct ones mixed with faults.

What it checks
--------------
A tiny Llama (``nd.testing.make_tiny_model``: 4 layers, hidden 128) is loaded with
``nd.LanguageModel(dir, tp=, pp=)`` (default tp=2 x pp=2, 4 ranks: world size must be
``tp * pp``). Each rank also loads the same checkpoint plainly with transformers
(``AutoModelForCausalLM``, no tp/pp, no nnsight_dist): the single-process reference.
Every correct body's values are computed on it once, with plain forward hooks doing what
the body does.

Then ``--traces`` traces run. Each draws its kind from a ``random.Random(--seed)``
(identical on every rank: the script is SPMD) among the correct kinds and the chosen
fault kinds (``--faults``), half of the draws a correct kind:

* correct kinds (``CORRECT``): ``save`` (two layers on two stages and the logits),
  ``edit`` (a row-parallel output edited in place on stage 0), ``read_edit`` (a stage-1
  value written into stage 1), ``barrier`` (a stage-0 value patched into stage 1 through
  a barrier between two invokes), ``cache`` (a whole cache over both stages), ``generate``
  (3 greedy tokens, ``tracer.iter`` reading the logits at every step, ``tracer.result``).
  Each must give the reference's values (relative 1e-4 of the largest reference value)
  and bit-identical values on every rank (a blake2b digest of the values' bytes,
  exchanged with an all-gather after every trace);
* fault kinds (``FAULTS``, the fault matrix): each must raise on every rank (the error
  types are recorded), except ``stop0``, ``stop1`` (``tracer.stop()`` on stage 0 / 1)
  and ``early_loop`` (``tracer.iter[:5]`` over a 2-token generation: nnsight cuts the
  loop with a warning), which must end normally with the reference's values for what was
  saved before the stop or in the loop.

A failure is a correct trace (or a stop) that raised, differed from the reference or
between ranks, or a fault that did not raise on every rank. Five failing traces in a row,
or a failing exchange, mean the job is lost: the soak ends there. Resident memory
(``psutil``, the largest over the ranks) is read after trace ``min(100, traces // 2)``
and at the end; it must grow < 5 %. No trace may hang: every wait of nnsight_dist is
bounded by ``--timeout`` (``NNSIGHT_DIST_TIMEOUT``), and a watchdog
(``faulthandler``) dumps every thread's stack and ends the rank if one trace lasts
longer than 3 x timeout + 30 s. The summary (rank 0) gives traces, each kind's count,
outcome and error types, the criteria, wall time and traces/s; the exit status is 1
when any criterion fails.

Running
-------
::

    launch/torchrun.sh 4 benchmarks/soak.py --traces 1000 --seed 0
    launch/torchrun.sh 4 benchmarks/soak.py --traces 200 --faults exc_all,out_of_order,stop0

Options: ``--traces N`` (default 1000), ``--seed N`` (default 0), ``--faults a,b`` (default
every kind), ``--tp``/``--pp`` (default 2/2), ``--timeout S`` (default 30), ``--check``
(check mode, ``NNSIGHT_DIST_CHECK=1``), ``--model-dir DIR`` (build the model there and
reuse it; default a temporary directory), ``--markdown``, ``--no-progress``.
From a test: ``run_ranks(soak, 4, path, traces, seed, faults)`` (see ``soak``).

Fault kinds that leave the job unusable today (see ``tests/distributed/test_soak.py``,
``EXCLUDED``) end the soak early: a failed exchange or five failing traces in a row is
reported as the job lost, and a rank gloo aborts takes the job down (torchrun ends the
others); none hangs.
"""

from __future__ import annotations

import collections
import datetime
import faulthandler
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

import nnsight_dist as nd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find common.py
import common  # noqa: E402

PROMPTS = ("The Eiffel Tower is in the city of", "Hello world")
CORRECT = ("save", "edit", "read_edit", "barrier", "cache", "generate")
FAULTS = ("exc_all", "exc_one_rank", "exc_after_remote", "out_of_order", "never_reached", "wrong_shape",
          "bad_path", "divergent", "early_loop", "stop0", "stop1", "cache_observer", "barrier_too_few")
RETURNING = ("early_loop", "stop0", "stop1")  # faults of the matrix that end normally (as in nnsight)
GROWTH_LIMIT = 5.0  # percent
LOST_AFTER = 5  # failing traces in a row


class Expected(Exception):
    """The exception a fault body raises on purpose."""


# ---------------------------------------------------------------------------- bodies
# Each takes (model, batch, rank) and returns its values (a list of tensors), under the
# same layer numbering at every tp/pp: layers 0-1 are stage 0, layers 2-3 stage 1 at pp=2.


def body_save(model, batch, rank):
    layers = model.model.layers
    with model.trace(batch):
        a = layers[1].output.save()
        b = layers[3].output.save()
        logits = model.lm_head.output.save()
    return [a, b, logits]


def body_edit(model, batch, rank):
    with model.trace(batch):
        model.model.layers[0].mlp.down_proj.output[:, -1] = 0
        logits = model.lm_head.output.save()
    return [logits]


def body_read_edit(model, batch, rank):
    layers = model.model.layers
    with model.trace(batch):
        attn = layers[3].self_attn.output[0]
        layers[3].mlp.output[:] = attn
        logits = model.lm_head.output.save()
    return [logits]


def body_barrier(model, batch, rank, participants=2):
    layers = model.model.layers
    with model.trace() as tracer:
        barrier = tracer.barrier(participants)
        with tracer.invoke(batch):
            h0 = layers[0].output[:, -1]
            barrier()
        with tracer.invoke(batch):
            barrier()
            layers[2].output[:, -1] = h0
            logits = model.lm_head.output.save()
    return [logits]


def body_cache(model, batch, rank):
    layers = model.model.layers
    with model.trace(batch) as tracer:
        cache = tracer.cache(modules=[layers[0].mlp, layers[3]])
    return [cache["model.model.layers.0.mlp"].output, cache["model.model.layers.3"].output]


def body_generate(model, batch, rank):
    with model.generate(batch, max_new_tokens=3, do_sample=False) as tracer:
        steps = nd.save([])
        for _ in tracer.iter[:3]:
            steps.append(model.lm_head.output[:, -1].argmax(-1))
        tokens = tracer.result.save()
    return [torch.stack(steps), tokens]


def fault_exc_all(model, batch, rank):
    with model.trace(batch):
        model.model.layers[1].output.save()
        raise Expected("on every rank")


def fault_exc_one_rank(model, batch, rank):
    with model.trace(batch):
        model.model.layers[0].mlp.input.save()
        if rank == 1:
            raise Expected("on rank 1 only")
        model.model.layers[0].mlp.down_proj.output.save()
        model.lm_head.output.save()


def fault_exc_after_remote(model, batch, rank):
    with model.trace(batch):
        model.model.layers[3].output.save()  # stage 1's: stage 0 raises right after it arrives
        raise Expected("after a value of another stage")


def fault_out_of_order(model, batch, rank):
    with model.trace(batch):
        model.model.layers[3].output.save()
        model.model.layers[1].output.save()


def fault_never_reached(model, batch, rank):
    layers = model.model.layers
    with model.trace(batch):
        layers[2].skip(layers[2].input)
        layers[2].mlp.output.save()  # the skipped layer's child never runs


def fault_wrong_shape(model, batch, rank):
    with model.trace(batch):
        model.model.layers[1].output = torch.zeros(1, 2, 3)
        model.lm_head.output.save()


def fault_bad_path(model, batch, rank):
    with model.trace(batch):
        model.model.layers[1].no_such_module.output.save()


def fault_divergent(model, batch, rank):
    with model.trace(batch):
        if rank == 0:
            model.model.layers[1].output.save()
        model.model.layers[3].output.save()


def fault_early_loop(model, batch, rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... was never reached": the loop is cut, as in nnsight
        with model.generate(batch, max_new_tokens=2, do_sample=False) as tracer:
            steps = nd.save([])
            for _ in tracer.iter[:5]:
                steps.append(model.lm_head.output[:, -1].argmax(-1))
    return [torch.stack(steps)]


def fault_stop0(model, batch, rank):
    with model.trace(batch) as tracer:
        early = model.model.layers[0].output.save()
        tracer.stop()
    return [early]


def fault_stop1(model, batch, rank):
    with model.trace(batch) as tracer:
        late = model.model.layers[3].output.save()
        tracer.stop()
    return [late]


def fault_cache_observer(model, batch, rank):
    layers = model.model.layers
    with model.trace(batch) as tracer:
        tracer.cache(modules=[layers[0].mlp, layers[3].mlp], device="no-such-device")  # raises in the observer
        model.lm_head.output.save()


def fault_barrier_too_few(model, batch, rank):
    return body_barrier(model, batch, rank, participants=3)  # three participants, two invokes


BODIES: dict[str, Callable] = {name: globals()[f"body_{name}"] for name in CORRECT}
BODIES.update({name: globals()[f"fault_{name}"] for name in FAULTS})


# ---------------------------------------------------------------------------- reference


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def reference(ref: torch.nn.Module, batch: dict, kind: str) -> list[torch.Tensor]:
    """``kind``'s values computed on the plain single-process model with forward hooks."""
    layers = ref.model.layers
    seen: dict[str, Any] = {}

    def record(name):
        def hook(mod, args, out):
            seen[name] = _first(out).detach().clone()
        return hook

    def run(pairs, **kw):
        with torch.no_grad(), common.hooks(pairs):
            return ref(**batch, **kw).logits

    if kind == "save":
        logits = run([(layers[1], record("a")), (layers[3], record("b"))])
        return [seen["a"], seen["b"], logits]
    if kind == "edit":
        def zero_last(mod, args, out):
            out[:, -1] = 0
            return out
        return [run([(layers[0].mlp.down_proj, zero_last)])]
    if kind == "read_edit":
        return [run([(layers[3].self_attn, record("attn")), (layers[3].mlp, lambda m, a, o: seen["attn"])])]
    if kind == "barrier":
        run([(layers[0], record("h0"))])

        def patch(mod, args, out):
            _first(out)[:, -1] = seen["h0"][:, -1]
            return out
        return [run([(layers[2], patch)])]
    if kind == "cache":
        run([(layers[0].mlp, record("mlp")), (layers[3], record("l3"))])
        return [seen["mlp"], seen["l3"]]
    if kind in ("generate", "early_loop"):
        n = 3 if kind == "generate" else 2
        steps: list[torch.Tensor] = []
        with torch.no_grad(), common.hooks([(ref.lm_head, lambda m, a, o: steps.append(o[:, -1].argmax(-1)))]):
            tokens = ref.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=ref.config.eos_token_id)
        return [torch.stack(steps), tokens] if kind == "generate" else [torch.stack(steps)]
    if kind == "stop0":
        run([(layers[0], record("h"))])
        return [seen["h"]]
    if kind == "stop1":
        run([(layers[3], record("h"))])
        return [seen["h"]]
    raise KeyError(kind)


def differs(ref: list[torch.Tensor], got: list[torch.Tensor]) -> Optional[str]:
    """``None`` when ``got`` matches ``ref`` within 1e-4 of the largest reference value, else why not."""
    got = common.flat(got)
    if len(got) != len(ref):
        return f"{len(got)} values, reference {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            return f"value {i}: shape {tuple(g.shape)}, reference {tuple(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, g):
                return f"value {i}: {g.tolist()} vs reference {r.tolist()}"
            continue
        scale = max(r.abs().max().item(), 1e-6)
        diff = (g.float() - r.float()).abs().max().item()
        if diff > 1e-4 * scale:
            return f"value {i}: max |diff| {diff:.3g} (reference scale {scale:.3g})"
    return None


def digest(values: list[torch.Tensor]) -> int:
    """A signed 64-bit blake2b digest of the values' shapes, dtypes and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for t in common.flat(values):
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest(), "little", signed=True)


# ---------------------------------------------------------------------------- exchange


def _error_names() -> list[str]:
    """Exception class names, identical on every rank: index 0 is "ok", the last "other"."""
    import builtins

    names = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    names |= {n for n, v in vars(nd).items() if isinstance(v, type) and issubclass(v, BaseException)}
    return ["ok", *sorted(names | {Expected.__name__}), "other"]


ERRORS = _error_names()


def exchange(group: Any, world: int, code: int, dig: int, mismatch: bool) -> torch.Tensor:
    """Every rank's ``[error code, digest, mismatch]`` of the trace: an all-gather on the
    soak's own ``group`` (``None`` in one process), so that a collective nnsight_dist left
    unmatched after a fault can never pair with it."""
    mine = torch.tensor([code, dig, int(mismatch)], dtype=torch.long)
    if group is None:
        return mine[None]
    import torch.distributed as dist

    out = [torch.zeros(3, dtype=torch.long) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------- the soak


def soak(rank: int, path: str, traces: int, seed: int, faults: Optional[list[str]] = None, tp: int = 2,
         pp: int = 2, timeout: Optional[float] = None, progress: bool = False, echo: bool = False) -> dict:
    """Run the soak on this rank (every rank of the job must call it alike) and return its
    summary: a JSON-able dict with ``failures`` (descriptions; empty when every criterion
    held), ``kinds`` (per kind: ``count``, ``ok``, ``errors`` as {type: count over ranks},
    ``ms`` median), ``traces`` run, ``lost`` (why the soak ended early, or ``None``),
    ``rss`` ([at the mark, at the end] bytes, the largest over the ranks), ``growth``
    (percent), ``wall`` seconds and ``first_errors`` ({kind: "Type: message"} seen on this rank).
    ``faults`` defaults to every kind of ``FAULTS``. ``progress`` shows a tqdm bar on stderr;
    ``echo`` prints each failure there as it happens (a rank that aborts takes the summary
    with it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    faults = list(FAULTS if faults is None else faults)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}")
    hf_logging.disable_progress_bar()
    topo = nd.init(tp=tp, pp=pp, timeout=timeout)
    limit = topo.timeout
    group = None
    if topo.distributed:
        import torch.distributed as dist

        group = dist.new_group(list(range(topo.world_size)), backend="gloo", timeout=datetime.timedelta(seconds=limit))
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = [tokenizer(p, return_tensors="pt") for p in PROMPTS]
    refs = {(kind, i): reference(ref, batches[i], kind) for kind in CORRECT + tuple(f for f in RETURNING if f in faults)
            for i in range(len(PROMPTS))}
    del ref

    rng = random.Random(seed)
    mark = max(1, min(100, traces // 2))
    kinds = {k: {"count": 0, "ok": 0, "errors": collections.Counter(), "ms": []} for k in CORRECT + tuple(faults)}
    failures: list[str] = []
    first_errors: dict[str, str] = {}
    rss_mark = None
    lost, in_a_row, done, previous = None, 0, 0, "-"
    start = time.perf_counter()
    bar = tqdm(range(traces), desc=f"soak tp={tp} pp={pp}", unit="trace", disable=not progress,
                      file=sys.stderr, mininterval=1.0)
    for n in bar:
        kind = rng.choice(CORRECT) if not faults or rng.random() < 0.5 else rng.choice(faults)
        prompt = rng.randrange(len(PROMPTS))
        faulthandler.dump_traceback_later(3 * limit + 30, exit=True)
        t0 = time.perf_counter()
        values, code, problem = None, 0, None
        try:
            values = BODIES[kind](model, batches[prompt], topo.rank)
        except Exception as e:  # recorded; whether it was expected is decided below, over all ranks
            code = ERRORS.index(type(e).__name__) if type(e).__name__ in ERRORS else len(ERRORS) - 1
            first_errors.setdefault(f"{kind}: {type(e).__name__}", str(e).splitlines()[0][:200] if str(e) else "")
        ms = (time.perf_counter() - t0) * 1e3
        if code == 0 and (kind, prompt) in refs:
            problem = differs(refs[(kind, prompt)], values)
            if problem:
                first_errors.setdefault(f"{kind}: mismatch", problem)
        try:
            seen = exchange(group, topo.world_size, code, digest(values) if code == 0 and values else 0, problem is not None)
        except Exception as e:  # the job's collectives are gone
            lost = f"trace {n} ({kind}, after {previous}): the per-trace exchange failed: {type(e).__name__}: {str(e)[:200]}"
            if echo:
                tqdm.write(f"LOST: {lost}", file=sys.stderr)
            break
        finally:
            faulthandler.cancel_dump_traceback_later()
        done = n + 1
        codes = seen[:, 0].tolist()
        stats = kinds[kind]
        stats["count"] += 1
        stats["ms"].append(ms)
        for c in codes:
            if c:
                stats["errors"][ERRORS[c]] += 1
        bad = None
        if kind in CORRECT or kind in RETURNING:
            if any(codes):
                bad = "raised " + ", ".join(f"r{r}:{ERRORS[c]}" for r, c in enumerate(codes) if c)
            elif seen[:, 2].any():
                bad = f"differs from the reference on ranks {seen[:, 2].nonzero().flatten().tolist()}"
            elif len(set(seen[:, 1].tolist())) > 1:
                bad = "values differ between ranks"
        elif not all(codes):
            bad = f"did not raise on ranks {[r for r, c in enumerate(codes) if not c]}"
        if bad:
            failures.append(f"trace {n} ({kind}, prompt {prompt}, after {previous}): {bad}")
            if echo:
                tqdm.write(f"FAILED: {failures[-1]}", file=sys.stderr)
            in_a_row += 1
        else:
            stats["ok"] += 1
            in_a_row = 0
        previous = kind
        if done == mark:
            rss_mark = rss()
        if progress:
            bar.set_postfix_str(f"{len(failures)} failed", refresh=False)
        if in_a_row >= LOST_AFTER:
            lost = f"trace {n}: {LOST_AFTER} failing traces in a row"
            break
    bar.close()
    wall = time.perf_counter() - start
    rss_end = rss()
    if lost is None:
        peaks = nd.gather_object([rss_mark or 0, rss_end])
        peaks = nd.broadcast_object([max(p[0] for p in peaks), max(p[1] for p in peaks)] if topo.rank == 0 else None)
        rss_mark, rss_end = peaks
    growth = 100.0 * (rss_end - rss_mark) / rss_mark if rss_mark else None
    if lost:
        failures.append(f"job lost at {lost}")
    if growth is None:
        failures.append(f"resident memory not measured (the soak ended before trace {mark})")
    elif growth >= GROWTH_LIMIT:
        failures.append(f"resident memory grew {growth:.1f} % from trace {mark} to the end (limit {GROWTH_LIMIT} %)")
    return {"traces": done, "tp": tp, "pp": pp, "seed": seed, "mark": mark, "failures": failures, "lost": lost,
            "rss": [rss_mark, rss_end], "growth": growth, "wall": wall,
            "kinds": {k: {"count": v["count"], "ok": v["ok"], "errors": dict(v["errors"]),
                          "ms": statistics.median(v["ms"]) if v["ms"] else None} for k, v in kinds.items()},
            "first_errors": first_errors}


# ---------------------------------------------------------------------------- report


def report(summary: dict, markdown: bool = False) -> str:
    """The summary as tables: one row per kind, then the criteria."""
    body = []
    for kind, v in summary["kinds"].items():
        if not v["count"]:
            continue
        expect = "values" if kind in CORRECT or kind in RETURNING else "raise"
        errors = ", ".join(f"{t} x{c}" for t, c in sorted(v["errors"].items())) or "-"
        body.append([kind, "correct" if kind in CORRECT else "fault", expect, str(v["count"]), str(v["ok"]),
                     common.fmt(v["ms"], ".0f"), errors])
    table = common.render(["kind", "class", "expects", "traces", "as expected", "median ms",
                           "errors raised (count over ranks)"], body, markdown, left=3)
    correct = sum(v["count"] for k, v in summary["kinds"].items() if k in CORRECT)
    mb = [common.fmt(x / 2**20 if x else None, ".1f") for x in summary["rss"]]
    wall = summary["wall"]
    totals = [["traces", str(summary["traces"])],
              ["correct traces", str(correct)],
              ["fault traces", str(summary["traces"] - correct)],
              ["failures", str(len(summary["failures"]))],
              [f"RSS after trace {summary['mark']} (MiB, max over ranks)", mb[0]],
              ["RSS at the end (MiB, max over ranks)", mb[1]],
              ["RSS growth", common.fmt(summary["growth"], "+.2f") + " %"],
              ["wall time (s)", f"{wall:.1f}"],
              ["traces/s", f"{summary['traces'] / wall:.2f}" if wall else "n/a"]]
    return table + "\n\n" + common.render(["", "value"], totals, markdown)


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--traces", type=int, default=1000, help="traces to run (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--faults", type=common.choices(FAULTS, "fault kind"), default=list(FAULTS),
                        help="comma-separated fault kinds (default all): " + ", ".join(FAULTS))
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (default 2)")
    parser.add_argument("--pp", type=int, default=2, help="pipeline-parallel degree (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds any wait may last (NNSIGHT_DIST_TIMEOUT; default 30)")
    parser.add_argument("--check", action="store_true",
                        help="check mode (NNSIGHT_DIST_CHECK=1): every whole value compared across its tp group")
    parser.add_argument("--model-dir", default=None, help="build the model in DIR and reuse it (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.traces < 1:
        parser.error("--traces must be at least 1")
    torch.set_num_threads(1)
    os.environ["NNSIGHT_DIST_TIMEOUT"] = str(args.timeout)
    if args.check:
        os.environ["NNSIGHT_DIST_CHECK"] = "1"
    topo = nd.init(tp=args.tp, pp=args.pp, timeout=args.timeout)
    if topo.dp != 1:
        raise SystemExit(f"run this on exactly tp*pp = {args.tp * args.pp} ranks (got {topo.world_size})")
    root = args.model_dir or nd.broadcast_object(tempfile.mkdtemp(prefix="nd_soak_") if topo.rank == 0 else None)
    path = os.path.join(root, "llama")
    if topo.rank == 0:
        nd.testing.make_tiny_model(path)
    nd.broadcast_object(path)  # the others wait until rank 0 has written it
    try:
        summary = soak(topo.rank, path, args.traces, args.seed, args.faults, args.tp, args.pp, args.timeout,
                       progress=topo.rank == 0 and not args.no_progress, echo=topo.rank == 0)
    finally:
        if args.model_dir is None and topo.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if topo.rank == 0:
        print(f"\nsoak: {summary['traces']} traces at tp={args.tp} x pp={args.pp} ({topo.world_size} ranks, "
              f"{topo.launcher}), seed {args.seed}, timeout {args.timeout:g} s, check mode "
              f"{'on' if os.environ.get('NNSIGHT_DIST_CHECK') == '1' else 'off'}, faults: {', '.join(args.faults)}")
        print(report(summary, args.markdown))
        for key, message in summary["first_errors"].items():
            print(f"  first {key}: {message}")
        for f in summary["failures"][:20]:
            print(f"FAILED: {f}")
        if len(summary["failures"]) > 20:
            print(f"FAILED: ... and {len(summary['failures']) - 20} more")
        print("PASS" if not summary["failures"] else "FAIL")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
