"""Checks and traffic accounting for ``benchmarks/distributed.py``.

What each scenario must give, from a single-process reference model with plain hooks;
the fewest router messages and tensor-parallel gathers it needs; counting the gathers
that run; and ``check_and_count``, which runs every scenario once per traced variant,
compares with the reference on every rank and sums the traffic over the ranks.
``s`` is always ``distributed.Setup``; the runs are passed in (``runners``), since
this module cannot import the script that imports it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

import nnsight_dist as nd
from nnsight_dist.distributed import placement as nd_placement
from nnsight_dist.distributed import replica as nd_replica

from common import GENERATE_TOKENS, flat, hooks, nbytes, same

Run = Callable[..., Any]  # (s, scenario, check=False) -> what it kept


# ---------------------------------------------------------------------------- reference
# The single-process model with hooks: what each scenario must give (checks), and the
# whole values a minimal router would send (traffic minimum).


def reference(s: Any, name: str) -> tuple[Any, list[tuple[str, Any]]]:
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


def engine_minimum(s: Any) -> dict[str, list[int]]:
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


def minimum(s: Any, name: str, reads: list[tuple[str, Any]]) -> dict[str, list[int]]:
    """The fewest router messages and bytes the scenario needs, by kind."""
    topo = s.topo
    if topo.pp == 1:
        return {}
    from nnsight_dist.engines.transformers import layer_range

    table = s.nd_model.placements()
    receivers = (topo.pp - 1) * topo.tp
    owned = [(path, table[path].owner_stage, v) for path, v in reads if table[path].owner_stage is not None]
    size = sum(nbytes(v) for _, _, v in owned) * receivers
    if name == "cache":
        # observed values travel together: one message from each owning rank to each other stage
        senders = len({stage for _, stage, _ in owned}) * topo.tp
        mins = {"o": [senders * (topo.pp - 1), size]} if owned else {}
    else:
        # A value read unchanged where the engine sends on (a stage's last layer to the next
        # stage, lm_head to every other) rides on the engine's message to those stages.
        carried = {f"model.model.layers.{layer_range(st, topo.pp, s.n_layers)[1] - 1}": 1 for st in range(topo.pp - 1)}
        carried["model.lm_head"] = topo.pp - 1
        alone = [(topo.pp - 1 - carried.get(path, 0)) * topo.tp for path, _, _ in owned]
        sent = [n * nbytes(v) for n, (_, _, v) in zip(alone, owned)]
        mins = {"v": [sum(alone), sum(sent)]} if sum(alone) else {}
    mins.update(s.engine_min["generate" if name == "generate" else "forward"])
    return mins


def fragmented_outputs(s: Any) -> set[str]:
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


def gather_minimum(s: Any, name: str, reads: list[tuple[str, Any]]) -> int:
    """Tensor-parallel gathers the scenario needs on one rank: one per read of a fragmented
    output; a cache needs one for all its fragments (nothing waits on them during the run)."""
    fragmented = sum(1 for path, _ in reads if path in s.fragmented)
    return min(fragmented, 1) if name == "cache" else fragmented



# ---------------------------------------------------------------------------- checks and traffic


@contextlib.contextmanager
def count_gathers():
    """Count the tensor-parallel gathers of fragmented locations (and their bytes) meanwhile."""
    cls = nd_placement.LayoutCodec
    original = cls._gather
    counts = [0, 0]

    def counted(self, t, *how):
        out = original(self, t, *how)
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



def check_and_count(s: Any, scenarios: list[str], variants: list[str],
                    runners: dict[str, Run]) -> dict[str, dict]:
    """Run each scenario once per traced variant; compare with the reference on every rank;
    record router traffic and tp gathers (summed over ranks). ``runners`` maps a variant to its
    run (``nnsight_dist``, and ``nnsight``/``p2p`` when in ``variants``). Returns per-scenario info on
    rank 0; records in ``s.nn_broken`` the scenarios nnsight fails."""
    nd_run, nn_run, p2p_run = runners["nnsight_dist"], runners.get("nnsight"), runners.get("p2p")
    topo = s.topo
    router = s.nd_model.interleaver.seam.router if topo.distributed else None
    info: dict[str, dict] = {}
    s.engine_min = engine_minimum(s)
    s.fragmented = fragmented_outputs(s)
    for name in scenarios:
        expected, reads = reference(s, name)
        problem = same(expected, nd_run(s, name, True), True)
        with count_gathers() as gathers:  # traffic of the timed body (no check read)
            nd_run(s, name)
        traffic = {k: list(v) for k, v in (router.traffic if router is not None else {}).items()}
        nn_problem = None
        if "nnsight" in variants:
            try:
                nn_problem = same(expected, nn_run(s, name, True), True)
            except Exception as e:
                nn_problem = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else '(no message)'}"
                if name == "cache":  # which part fails, and are the other values whole?
                    try:
                        partial = nn_run(s, "cache_but_embedding", True)
                        rest = {k: v for k, v in expected.items() if not k.endswith("embed_tokens")}
                        nn_problem += ("; a cache of every module but embed_tokens runs: "
                                       + (same(rest, partial, True) or "all values whole and equal"))
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
            p2p_problem = same(expected if name == "empty" else expected[1], got, True)
            if p2p_problem:
                raise SystemExit(f"the hand-made p2p pipeline is wrong on rank {topo.rank} ({name}): {p2p_problem}")
        failed = nd.broadcast_object(info[name]["nnsight_check"] if topo.rank == 0 else None)
        if failed and failed.startswith("FAILED"):
            s.nn_broken[name] = failed
    return info
