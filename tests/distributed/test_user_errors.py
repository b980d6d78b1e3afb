"""Mistakes a new user makes, on forked gloo ranks and in one process: each ends in a named
``nd.NNsightError`` on every rank, inside the test's own timeout, whose message says what
was wrong and what to do; a correct call afterwards works and gives the right values."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

ENV = {"NNSIGHT_DIST_TIMEOUT": "6"}


def _error(fn) -> tuple:
    """``("error", type name, message, is NNsightError)`` of ``fn()``, else ``("ok", value)``."""
    try:
        return ("ok", fn())
    except Exception as e:  # every kind is checked by the caller
        return ("error", type(e).__name__, str(e), isinstance(e, nd.NNsightError))


def _value(rank: int) -> dict:
    """A rank's value with tensors of several dtypes, nested, and every JSON kind."""
    g = torch.Generator().manual_seed(rank)
    return {"rank": rank, "name": f"r{rank}", "none": None, "ok": rank % 2 == 0, "x": 0.5 * rank,
            "t": torch.randn(2, 3, generator=g), "pair": (torch.arange(rank + 1), [True, torch.tensor(rank > 0)]),
            7: torch.randn(4, generator=g).to(torch.bfloat16), ("k", 1): "tuple key", "empty": torch.zeros(0, 5)}


def _same(a, b) -> bool:
    """Equal values of the same types, tensors bit-for-bit with their dtype and shape."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------- objects, 2 ranks


class Point:
    def __init__(self, x):
        self.x = x


UNSENDABLE = {  # what rank 1 sends -> the words its error names
    "set": ({"a": [{1, 2}]}, ["obj['a'][0]", "set", "sorted(s)"]),
    "bytes": (b"abc", ["bytes", "decode"]),
    "numpy": ({"a": np.ones(2)}, ["numpy", "torch.from_numpy"]),
    "class": ([Point(1)], ["Point", "dict", "pickled"]),
    "complex": (torch.ones(2, dtype=torch.complex64), ["complex64", "view_as_real"]),
    "meta": (torch.empty(2, device="meta"), ["without data", "shape"]),
    "key": ({torch.ones(1): 1}, ["key", "Tensor"]),
}


def _unsendable(rank: int, case: str) -> dict:
    nd.init()
    bad, _ = UNSENDABLE[case]
    return {"gather": _error(lambda: nd.gather_object(bad if rank == 1 else rank)),
            "broadcast": _error(lambda: nd.broadcast_object(bad if rank == 1 else None, src=1)),
            "after": nd.gather_object(_value(rank)), "after_b": nd.broadcast_object(_value(rank), src=1)}


@pytest.mark.parametrize("case", list(UNSENDABLE))
def test_unsendable_value_every_rank(case):
    results = run_ranks(_unsendable, 2, case, timeout=90, env=ENV)
    words = UNSENDABLE[case][1]
    for rank, r in enumerate(results):
        for call, name in (("gather", "nd.gather_object(dst=0)"), ("broadcast", "nd.broadcast_object(src=1)")):
            status, kind, message, ours = r[call]
            assert (status, kind, ours) == ("error", "UnsendableObject", True), r[call]
            assert name in message and "rank(s) [1]" in message, message
            assert all(w in message for w in words), (words, message)
        assert _same(r["after_b"], _value(1))
    assert _same(results[0]["after"], [_value(0), _value(1)]) and results[1]["after"] is None


def _roundtrip(rank: int) -> dict:
    nd.init()
    return {"gather": nd.gather_object(_value(rank), dst=1), "broadcast": nd.broadcast_object(_value(rank), src=1),
            "json": nd.gather_object([rank, {"s": "é"}])}


def test_tensors_travel_tp1_two_ranks():
    """Tensors (several dtypes, 0-d, empty, nested) arrive bit-for-bit, as do tuples and non-string keys."""
    results = run_ranks(_roundtrip, 2, timeout=90, env=ENV)
    assert results[0]["gather"] is None and _same(results[1]["gather"], [_value(0), _value(1)])
    assert all(_same(r["broadcast"], _value(1)) for r in results)
    assert results[0]["json"] == [[0, {"s": "é"}], [1, {"s": "é"}]]


def _mismatched(rank: int, case: str) -> dict:
    nd.init()
    if case == "skip":  # rank 1 makes no call while rank 0 waits (a skipped call, a long job)
        first = _error(lambda: nd.gather_object(rank)) if rank == 0 else time.sleep(8)
        later = _error(lambda: nd.broadcast_object("x"))
        return {"first": first, "later": later}
    if case == "kind":
        call = (lambda: nd.gather_object(rank)) if rank == 0 else (lambda: nd.broadcast_object(rank))
    else:
        call = lambda: nd.gather_object(rank, dst=rank)  # noqa: E731
    return {"first": _error(call), "after": nd.broadcast_object(torch.arange(3) * rank, src=1)}


@pytest.mark.parametrize("case", ["kind", "dst"])
def test_different_calls_every_rank(case):
    results = run_ranks(_mismatched, 2, case, timeout=90, env=ENV)
    for r in results:
        status, kind, message, ours = r["first"]
        assert (status, kind, ours) == ("error", "DivergenceError", True), r["first"]
        assert "rank 0: nd.gather_object(dst=0)" in message and "same" in message, message
        assert _same(r["after"], torch.arange(3))


def test_call_one_rank_skips_times_out():
    """A call one rank never makes: a timeout naming that rank, then every later call raises at once."""
    results = run_ranks(_mismatched, 2, "skip", timeout=90, env=ENV)
    status, kind, message, ours = results[0]["first"]
    assert (status, kind, ours) == ("error", "RouterTimeout", True)
    assert "rank(s) [1] never made this call" in message and "nd.gather_object(dst=0)" in message, message
    for rank, r in enumerate(results):
        status, kind, message, ours = r["later"]
        assert status == "error" and ours and kind == ("RouterTimeout" if rank == 0 else "RemoteError"), r["later"]
        assert "out of step" in message and "restart the job" in message, message


def _roots(rank: int) -> dict:
    nd.init()
    return {"dst": _error(lambda: nd.gather_object(rank, dst=5)), "src": _error(lambda: nd.broadcast_object(1, src=-1)),
            "after": nd.gather_object(rank)}


def test_root_outside_world():
    results = run_ranks(_roots, 2, timeout=90, env=ENV)
    for r in results:
        assert r["dst"][:2] == ("error", "TopologyError") and "dst=5" in r["dst"][2] and "0 to 1" in r["dst"][2]
        assert r["src"][:2] == ("error", "TopologyError") and "src=-1" in r["src"][2]
    assert results[0]["after"] == [0, 1]


def _before_init(rank: int) -> dict:
    return {"gather": _error(lambda: nd.gather_object(rank)), "after": (nd.init(), nd.gather_object(rank))[1]}


def test_exchange_before_init():
    results = run_ranks(_before_init, 2, timeout=90, env=ENV)
    for r in results:
        assert r["gather"][:2] == ("error", "TopologyError") and "before nd.init" in r["gather"][2]
    assert results[0]["after"] == [0, 1]


# ---------------------------------------------------------------------- objects, one process


def test_one_process_same_rules():
    """In one process the values come back as copies, after the same checks as on ranks."""
    value = _value(0)
    got = nd.gather_object(value)
    assert _same(got, [value]) and got[0]["t"] is not value["t"]
    assert _same(nd.broadcast_object(value), value)
    for case, (bad, words) in UNSENDABLE.items():
        with pytest.raises(nd.UnsendableObject) as info:
            nd.gather_object(bad)
        assert isinstance(info.value, TypeError) and all(w in str(info.value) for w in words), (case, info.value)
    with pytest.raises(nd.TopologyError, match=r"dst=1\): dst must be"):
        nd.gather_object(1, dst=1)


# ---------------------------------------------------------------------- a model on ranks


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _reference(path: str, prompt: str, layers: list[int]) -> dict:
    """Plain transformers in this process: the chosen layers' outputs and the logits."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    seen = {}
    hooks = [ref.model.layers[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
             for i in layers]
    with torch.no_grad():
        logits = ref(**tok(prompt, return_tensors="pt")).logits
    for h in hooks:
        h.remove()
    return {"layers": seen, "logits": logits}


def _model_mistakes(rank: int, path: str, tp: int, pp: int) -> dict:
    out = {"tp3": _error(lambda: nd.LanguageModel(path, tp=3))}
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    topo = model.topology
    out["reinit"] = _error(lambda: nd.init(tp=1, pp=1) if tp * pp == 1 else nd.init(tp=2 * tp, pp=pp))
    out["zero"] = _error(lambda: nd.init(pp=0))
    out["same"] = nd.init(tp=tp, pp=pp) is topo and nd.init() is topo

    def inside():
        with model.trace("Hello world") as tracer:
            cache = tracer.cache(modules=[model.model.layers[0]], sharded=True)
            cache.gather()

    out["inside"] = _error(inside)
    with model.trace("Hello world") as tracer:
        cache = tracer.cache(modules=[model.model.layers[0], model.model.layers[3]], sharded=True)
        logits = model.lm_head.output.save()
    out["dst"] = _error(lambda: cache.gather(dst=topo.tp * topo.pp))
    whole = cache.gather(dst=1)
    out["whole"] = None if whole is None else {i: whole[f"model.model.layers.{i}"].output for i in (0, 3)}
    out["gathered"] = nd.gather_object({"logits": logits[0, -1], "rank": rank}, dst=1)
    return out


def _mistake_then_trace(rank: int, path: str, tp: int, pp: int, mistake: str) -> dict:
    """A trace with ``mistake`` (``"backward"``: ``loss.backward()``; ``"inputs"``: each rank
    of the replica its own prompt), then a correct trace's logits."""
    model = nd.LanguageModel(path, tp=tp, pp=pp)

    def backward():
        with model.trace("Hello world"):
            model.lm_head.output.sum().backward()

    prompt = "Hello world" if rank == 0 else "The Eiffel Tower is in the city of"
    wrong = backward if mistake == "backward" else lambda: _logits(model, prompt)
    return {"error": _error(wrong), "logits": _logits(model, "Hello world")}


def _logits(model, prompt):
    with model.trace(prompt):
        logits = model.lm_head.output.save()
    return logits


def _mistake_results(path: str, topology: str, mistake: str) -> list:
    """Each rank's ``_mistake_then_trace`` result; its correct trace equals plain transformers."""
    tp, pp = (2, 1) if topology == "tp2" else (1, 2)
    results = run_ranks(_mistake_then_trace, 2, path, tp, pp, mistake, timeout=240, env=ENV)
    ref = _reference(path, "Hello world", [])
    for r in results:
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    return results


@pytest.mark.parametrize("topology", ["tp2", "pp2"])
def test_backward_in_a_distributed_trace(path, topology):
    """``loss.backward()`` as a statement: torch's own backward. A trace whose body calls it
    keeps its graph, so under tp it runs; under pp it would stop at the stage's boundary and
    is refused on every rank (was torch's raw "element 0 of tensors does not require grad")."""
    results = _mistake_results(path, topology, "backward")
    if topology == "tp2":
        assert [r["error"] for r in results] == [("ok", None)] * 2
        return
    for r in results:
        assert r["error"][0] == "error" and r["error"][1] in ("NNsightError", "RemoteError"), r["error"]
        assert "loss.backward() as a statement" in r["error"][2] and "with loss.backward():" in r["error"][2]
    assert any(r["error"][1] == "NNsightError" for r in results)


@pytest.mark.parametrize("topology", ["tp2", "pp2"])
def test_different_inputs_on_the_ranks_of_a_replica(path, topology):
    """Without the check, tp=2 crashed inside gloo and pp=2 gave torch's size mismatch."""
    for r in _mistake_results(path, topology, "inputs"):
        assert r["error"][:2] == ("error", "DivergenceError"), r["error"]
        assert "different inputs (ranks [1] differ from rank 0)" in r["error"][2]


@pytest.mark.parametrize("topology", ["tp2", "pp2"])
def test_model_mistakes_two_ranks(path, topology):
    tp, pp = (2, 1) if topology == "tp2" else (1, 2)
    results = run_ranks(_model_mistakes, 2, path, tp, pp, timeout=240, env=ENV)
    for r in results:
        assert r["tp3"][:2] == ("error", "TopologyError") and "does not divide the world size 2" in r["tp3"][2]
        assert r["reinit"][:2] == ("error", "TopologyError") and f"tp={tp}, pp={pp}" in r["reinit"][2], r["reinit"]
        assert "same degrees" in r["reinit"][2]
        assert r["zero"][:2] == ("error", "TopologyError") and "positive integer" in r["zero"][2]
        assert r["same"]
        assert r["inside"][:2] == ("error", "NNsightError") and "after the `with` block" in r["inside"][2]
        assert r["dst"][:2] == ("error", "TopologyError") and "dst=2" in r["dst"][2] and "0 to 1" in r["dst"][2]
    ref = _reference(path, "Hello world", [0, 3])
    assert results[0]["whole"] is None and results[0]["gathered"] is None
    for i in (0, 3):
        torch.testing.assert_close(results[1]["whole"][i], ref["layers"][i], rtol=1e-5, atol=1e-5)
    got = results[1]["gathered"]
    assert [g["rank"] for g in got] == [0, 1]
    for g in got:
        torch.testing.assert_close(g["logits"], ref["logits"][0, -1], rtol=1e-5, atol=1e-5)


def _mesh_tp2_pp2(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2, pp=2)
    with model.trace("Hello world"):
        h = model.model.layers[3].output.save()
    out = {"dst": _error(lambda: nd.gather_object(h, dst=rank % 2)),
           "unsendable": _error(lambda: nd.broadcast_object({"h": h, "set": {rank}}, src=2))}
    out["gathered"] = nd.gather_object({"h": h[0, -1], "stage": model.topology.pp_rank}, dst=3)
    out["said"] = nd.broadcast_object((h[0, 0], rank) if rank == 2 else None, src=2)
    return out


def test_objects_tp2_pp2(path):
    """On 4 ranks (tp 2 × pp 2): the same errors everywhere, then whole values from every stage."""
    results = run_ranks(_mesh_tp2_pp2, 4, path, timeout=300, env=ENV)
    ref = _reference(path, "Hello world", [3])["layers"][3]
    for rank, r in enumerate(results):
        assert r["dst"][:2] == ("error", "DivergenceError") and "rank 1: nd.gather_object(dst=1)" in r["dst"][2]
        status, kind, message, _ = r["unsendable"]
        assert kind == "UnsendableObject" and "rank(s) [2]" in message and "obj['set']" in message, message
        said_h, said_rank = r["said"]
        torch.testing.assert_close(said_h, ref[0, 0], rtol=1e-5, atol=1e-5)
        assert said_rank == 2
        assert (r["gathered"] is None) == (rank != 3)
    got = results[3]["gathered"]
    assert [g["stage"] for g in got] == [0, 0, 1, 1]
    for g in got:
        torch.testing.assert_close(g["h"], ref[0, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- one process, beside nnsight 0.8.1


@pytest.fixture(scope="module")
def pair(path):
    """(nd model, nnsight 0.8.1 model) on the same checkpoint, in this process."""
    import importlib
    import warnings

    import transformers

    ours = nd.LanguageModel(path)  # first: nd's `.save()` methods are installed before nnsight's
    nnsight = importlib.import_module("nnsight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nnsight.LanguageModel(path, tokenizer=transformers.AutoTokenizer.from_pretrained(path), dispatch=True)
    return ours, theirs


def _grad_warnings(body) -> tuple:
    """``body()`` and the gradient warnings it raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = body()
    return value, sorted({(w.category.__name__, str(w.message)) for w in caught if "grad" in str(w.message)})


def test_grad_before_backward_one_process_as_nnsight(pair):
    """In one process ``.grad`` before a backward is torch's: ``None`` and torch's non-leaf
    warning, as nnsight 0.8.1 gives on the same weights (nothing for nd to rewrite)."""
    ours, theirs = pair

    def their_grad():
        with theirs.trace("Hello world"):
            grad = theirs.model.layers[0].output.grad.save()
        return grad

    def our_grad():
        with ours.trace("Hello world"):
            grad = nd.save(ours.model.layers[0].output.grad)
        return grad

    expected, their_warnings = _grad_warnings(their_grad)
    got, our_warnings = _grad_warnings(our_grad)
    assert got is None and expected is None
    assert our_warnings == their_warnings and their_warnings, (our_warnings, their_warnings)


def test_paths_past_the_tree_one_process(pair):
    """A layer index past the list and a path that breaks name where and what exists; the
    type is nnsight 0.8.1's (AttributeError); correct paths still give their placement."""
    ours, theirs = pair
    n = len(ours.model.layers)
    with pytest.raises(AttributeError):
        theirs.model.layers[n]
    with pytest.raises(nd.ModulePathError) as info:
        ours.model.layers[n]
    assert isinstance(info.value, AttributeError) and f"has {n} children, so no [{n}]" in str(info.value)
    assert ours.model.layers[-1].path == f"model.model.layers.{n - 1}" and len(ours.model.layers[1:3]) == 2
    for path in (f"model.layers.{n}", f"model.model.layers.{n}"):
        with pytest.raises(nd.ModulePathError, match=rf"model\.model\.layers \(ModuleList\) has {n} children"):
            ours.placement(path)
    with pytest.raises(nd.ModulePathError, match="Did you mean: mlp"):
        ours.placement("model.layers.1.mlpp")
    with pytest.raises(TypeError, match="module path"):
        ours.placement(1)
    expected = ours.placements()["model.model.layers.1.mlp"]
    assert ours.placement(ours.model.layers[1].mlp) == ours.placement("model.layers.1.mlp") == expected
