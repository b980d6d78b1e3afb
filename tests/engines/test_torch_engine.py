"""The torch engine (``engine="torch"``: ``parallelize_module`` with torch's parallel styles).

On forked gloo ranks, against the single-process run of the same tiny model:

- the conformance values (``scenarios.trace_values``) at tp=2, pp=2, tp=2 × pp=2 and tp=2 × dp=2, within
  1e-4 relative and bit-identical across the ranks (llama and qwen2); greedy generation at
  tp=2 × pp=2;
- ``placements()`` against what the engine really hands over at every module boundary:
  plain ``register_forward_hook``s on the sharded model record each module's local first
  argument and output, which must be the single-process value (``whole``) or its slice of
  it (``shard(d)``), element by element for tuples; the parameters must be torch's
  ``DTensor`` shards the styles' layouts say;
- gradients at tp=2 (``test_gradients_tp2.gradient_values``) and across stages at
  tp=2 × pp=2 (``test_gradients_pp2.grad_values``) against one process.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import nnsight_dist as nd
from distributed.scenarios import assert_conformance, trace_values
from distributed.test_gradients_pp2 import grad_values
from distributed.test_gradients_tp2 import PROMPTS, close, gradient_values
from nnsight_dist.distributed.placement import LOCAL, WHOLE, elements, shard_dim
from nnsight_dist.testing.ranks import run_ranks

ENV = {"NNSIGHT_DIST_TIMEOUT": "60", "NNSIGHT_DIST_CHECK": "1"}
TOPOLOGIES = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2_pp2": (4, 2, 2), "tp2_dp2": (4, 2, 1)}  # (world, tp, pp)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")), arch="llama")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, path, tmp_path_factory):
    """A tiny model (qwen2: column-parallel layers with biases) and its single-process values."""
    if request.param != "llama":
        path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    return path, trace_values(nd.LanguageModel(path))


def _rank_values(rank: int, path: str, tp: int, pp: int) -> dict:
    return trace_values(nd.LanguageModel(path, tp=tp, pp=pp, engine="torch"))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_conformance(reference, topology):
    path, reference = reference
    world, tp, pp = TOPOLOGIES[topology]
    results = run_ranks(_rank_values, world, path, tp, pp, timeout=240, env=ENV)
    assert_conformance(results, reference, tp * pp, f"torch {topology}")


def _generated(model) -> dict:
    """Greedy generation: each step's last logits, read through ``tracer.iter``, and the ids."""
    with model.generate(PROMPTS[0], max_new_tokens=3, do_sample=False) as tracer:
        logits = nd.save([])
        for _ in tracer.iter[0:3]:
            logits.append(model.lm_head.output[:, -1])
        ids = tracer.result.save()
    return {"ids": ids, "logits": torch.stack(list(logits))}


def _rank_generated(rank: int, path: str) -> dict:
    return _generated(nd.LanguageModel(path, tp=2, pp=2, engine="torch"))


def test_generate_tp2_pp2(path):
    want = _generated(nd.LanguageModel(path))
    for values in run_ranks(_rank_generated, 4, path, timeout=240, env=ENV):
        assert torch.equal(values["ids"], want["ids"])
        torch.testing.assert_close(values["logits"], want["logits"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- placements

def _boundaries(module: torch.nn.Module, ids: torch.Tensor) -> dict[str, tuple]:
    """Each module's first argument and output in one forward, seen by plain hooks."""
    seen = {}

    def record(name):
        def hook(mod, args, kwargs, out):
            seen[name] = (args[0] if args else next(iter(kwargs.values()), None), out)
        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in module.named_modules()]
    with torch.no_grad():
        module(ids)
    for h in handles:
        h.remove()
    return seen


def _expected_local(placement: str, whole, tp: int, tp_rank: int):
    """This rank's part of ``whole`` under ``placement``; ``None`` where nothing is promised."""
    parts = elements(placement)
    if parts is not None:
        if not isinstance(whole, tuple):
            return _expected_local(parts[1].get(0, WHOLE), whole, tp, tp_rank)
        return tuple(_expected_local(parts[1].get(i, LOCAL), w, tp, tp_rank) for i, w in enumerate(whole))
    if not isinstance(whole, torch.Tensor) or placement == LOCAL:
        return None
    if placement == WHOLE:
        return whole
    return whole.chunk(tp, shard_dim(placement))[tp_rank]


def _placement_check(rank: int, path: str) -> dict:
    from torch.distributed.tensor import DTensor

    model = nd.LanguageModel(path, tp=2, engine="torch")
    topo = model.topology
    plain = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    whole, local = _boundaries(plain, ids), _boundaries(model._module, ids)
    checked, fragments, bad = 0, 0, []
    for full, placement in model.placements().items():
        name = full.removeprefix(model.path).lstrip(".")
        if name not in whole:
            continue  # a container never called (the layers' ModuleList)
        for side, index in (("input", 0), ("output", 1)):
            want = _expected_local(getattr(placement, side), whole[name][index], topo.tp, topo.tp_rank)
            got = local[name][index]
            pairs = zip(got, want) if isinstance(want, tuple) else [(got, want)]
            for g, w in pairs:
                if w is None:
                    continue
                checked += 1
                fragments += g.shape != whole[name][index].shape if not isinstance(want, tuple) else 0
                if g.shape != w.shape or not torch.allclose(g, w, rtol=1e-4, atol=1e-5):
                    bad.append(f"{name}.{side}: {getattr(placement, side)}")
    dtensors = {n: (repr(t.placements[0]), list(t.to_local().shape), list(t.shape))
                for n, t in model._module.named_parameters() if isinstance(t, DTensor)}
    return {"checked": checked, "fragments": fragments, "bad": bad, "dtensors": dtensors,
            "placements": {p.path: (p.input, p.output) for p in model.placements().values()}}


def test_placements_describe_what_each_module_hands_over(path):
    """Every module's input and output placement holds against the single-process values,
    and the sliced ones sit where torch's styles shard the weights: a module whose output is
    a slice holds its weight's rows (``Shard(0)``, column-parallel), one whose input is a
    slice holds its columns (``Shard(1)``, row-parallel), each a DTensor of half the size."""
    results = run_ranks(_placement_check, 2, path, timeout=240, env=ENV)
    for values in results:
        assert values["bad"] == []
        assert values["checked"] > 60 and values["fragments"] >= 8  # q/k/v/o, gate/up/down, ... are sliced
        assert values["placements"] == results[0]["placements"]
    table, dtensors = results[0]["placements"], results[0]["dtensors"]
    linears = 0
    for full, (inp, out) in table.items():
        weight = dtensors.get(full.removeprefix("model.") + ".weight")
        for dim, sliced in ((0, out == "shard(-1)" and inp == "whole"), (1, inp == "shard(-1)" and out == "whole")):
            if sliced:
                linears += 1
                placement, local, whole = weight
                assert placement == f"Shard(dim={dim})" and local[dim] * 2 == whole[dim], (full, weight)
    config = transformers.AutoConfig.from_pretrained(path)
    assert linears == 7 * config.num_hidden_layers  # q, k, v, gate, up (column) and o, down (row)


def _gradients(rank: int, path: str) -> dict:
    return gradient_values(nd.LanguageModel(path, tp=2, engine="torch"), PROMPTS[0])


def test_gradients_match_one_process(path):
    """DTensor's collectives are differentiable: ``.grad`` of every placement, writes to it
    and parameter gradients (DTensor shards) as in one process, the same on both ranks."""
    _assert_gradients(run_ranks(_gradients, 2, path, timeout=240, env=ENV),
                      gradient_values(nd.LanguageModel(path), PROMPTS[0]))


def _assert_gradients(results: list[dict], want: dict) -> None:
    """Every rank's gradients are one process's, and the same on every rank."""
    for rank, values in enumerate(results):
        assert set(values) == set(want)
        for name, got in values.items():
            close(got, want[name], f"rank {rank} {name}")
            assert torch.equal(got, results[0][name]), f"{name} differs between ranks 0 and {rank}"


def _stage_gradients(rank: int, path: str) -> dict:
    return grad_values(nd.LanguageModel(path, tp=2, pp=2, engine="torch"))


def test_gradients_tp2_pp2_match_one_process(path):
    """Gradients cross stages (the router's transfers) and tensor-parallel layers (DTensor's)."""
    _assert_gradients(run_ranks(_stage_gradients, 4, path, timeout=300, env=ENV), grad_values(nd.LanguageModel(path)))


def test_a_plan_style_torch_has_no_style_for_is_refused_before_loading(path):
    """``check`` answers from the configuration: a plan naming a style without a torch
    parallel style (transformers' ``packed_colwise``, say) is :class:`UnshardableModel`."""
    from nnsight_dist.engines import torch_tp
    from nnsight_dist.intervention.errors import UnshardableModel

    config = transformers.AutoConfig.from_pretrained(path)
    torch_tp.check(config, 2, 1)
    config.base_model_tp_plan = {**config.base_model_tp_plan, "layers.*.mlp.gate_proj": "packed_colwise"}
    with pytest.raises(UnshardableModel, match="packed_colwise.*engine='transformers'"):
        torch_tp.check(config, 2, 1)
    torch_tp.check(config, 1, 1)  # nothing is parallelized at tp=1
