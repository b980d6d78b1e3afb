"""``engine="deepspeed"``: DeepSpeed AutoTP on forked gloo ranks, checked against one process.

The conformance values (``tests/distributed/scenarios.trace_values``) at tp=2 and at
tp=2 × dp=2 must match the single-process run of the same tiny model within 1e-4 relative
and be bit-identical across ranks. Parameter reads are whole and equal the checkpoint's;
backward is refused on every rank and the next trace works; the placements agree with the
classes DeepSpeed swapped in; a real ``torchrun`` run matches one process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

import nnsight_dist as nd  # noqa: E402
from nnsight_dist.intervention.errors import MissedProviderError, NNsightError, UnshardableModel  # noqa: E402
from nnsight_dist.testing.ranks import run_ranks  # noqa: E402

from distributed.scenarios import PROMPTS, assert_conformance, trace_values  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Check mode (as tests/distributed): every value served whole is compared across the tp group.
ENV = {"NNSIGHT_DIST_TIMEOUT": "60", "NNSIGHT_DIST_CHECK": "1"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    return path, trace_values(nd.LanguageModel(path))


def _values(rank: int, path: str) -> dict:
    return trace_values(nd.LanguageModel(path, tp=2, engine="deepspeed"))


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp2_dp2"])
def test_conformance(reference, world):
    path, expected = reference
    results = run_ranks(_values, world, path, timeout=300, env=ENV)
    assert_conformance(results, expected, 2, f"deepspeed world {world}")


def _parameters_and_placements(rank: int, path: str) -> dict:
    from deepspeed.module_inject.layers import TensorParallel_Layer

    model = nd.LanguageModel(path, tp=2, engine="deepspeed")
    params = {}
    for name, param in model._module.named_parameters():
        module_name, _, attr = name.rpartition(".")
        params[name] = (getattr(model.get(module_name), attr).detach().clone(), list(param.shape))
    table = model.placements()
    modules = {}
    for name, module in model._module.named_modules():
        p = table[f"model.{name}" if name else "model"]
        swapped = type(module).__name__ if isinstance(module, TensorParallel_Layer) else None
        modules[name] = (swapped, p.input, p.output, dict(p.parameters))
    # DeepSpeed's shared-memory all-reduce kernel (which ignores the group) is never loaded.
    kernel = hasattr(torch.ops.deepspeed, "inference_all_reduce_")
    return {"params": params, "modules": modules, "kernel": kernel}


#: DeepSpeed's layer classes as their source reads (deepspeed/module_inject/layers.py):
#: (input, output, sliced parameters).
CLASSES = {
    # x @ W_r.T: this rank's output columns; weight and bias cut along dim 0.
    "LinearLayer": ("whole", "shard(-1)", {"weight": "shard(0)", "bias": "shard(0)"}),
    # this rank's input columns @ W_r.T, all-reduced, plus the replicated bias.
    "LinearAllreduce": ("shard(-1)", "whole", {"weight": "shard(1)"}),
    # slices its whole input itself, then all-reduces.
    "LmHeadLinearAllreduce": ("whole", "whole", {"weight": "shard(1)"}),
}


def test_parameters_whole_and_placements_from_classes(reference):
    """Every parameter read through the envoy is the checkpoint's whole tensor, though each
    rank holds slices of the swapped layers' weights; and each swapped layer's placement is
    its class's (:data:`CLASSES`); between a column- and a row-parallel layer a module sees
    this rank's slice; an attention returns its heads' weights; everything else is whole."""
    import transformers

    path, _ = reference
    whole = dict(transformers.AutoModelForCausalLM.from_pretrained(path).named_parameters())
    for result in run_ranks(_parameters_and_placements, 2, path, timeout=300, env=ENV):
        params, modules = result["params"], result["modules"]
        assert not result["kernel"]
        assert set(params) == set(whole)
        for name, (value, local) in params.items():
            torch.testing.assert_close(value, whole[name].detach(), rtol=0, atol=0)
            module, _, attr = name.rpartition(".")
            sliced = modules[module][3].get(attr)
            assert (local != list(value.shape)) == (sliced is not None), f"{name}: {local} {sliced}"
        assert {m[0] for m in modules.values()} == {None, *CLASSES}
        for name, (swapped, inp, out, sliced) in modules.items():
            if swapped:
                want_in, want_out, want_params = CLASSES[swapped]
                owned = {k: v for k, v in want_params.items() if f"{name}.{k}" in whole}
                assert (inp, out, sliced) == (want_in, want_out, owned), name
            elif name.endswith("mlp.act_fn"):
                assert (inp, out, sliced) == ("shard(-1)", "shard(-1)", {}), name
            elif name.endswith("self_attn"):
                assert (inp, out, sliced) == ("whole", "(whole, shard(1))", {}), name
            elif name.endswith("mlp"):  # a parent of column- and row-parallel layers: its first element
                assert (inp, out, sliced) == ("whole", "(whole)", {}), name
            elif name in ("", "model"):  # the model outputs: this rank's heads' attention weights refused
                assert (inp, out, sliced) == ("whole", "{attentions: local}", {}), name
            else:
                assert (inp, out, sliced) == ("whole", "whole", {}), name


def _backward(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2, engine="deepspeed")
    try:
        with model.trace(PROMPTS[0]):
            model.output.logits.sum().backward()
    except NNsightError as error:
        refused = str(error)
    else:
        refused = ""
    with model.trace(PROMPTS[0]):
        logits = model.lm_head.output.save()
    return {"refused": refused, "logits": logits}


def test_backward_refused_on_every_rank_then_next_trace_works(reference):
    path, _ = reference
    want = nd.LanguageModel(path)
    with want.trace(PROMPTS[0]):
        logits = want.lm_head.output.save()
    for values in run_ranks(_backward, 2, path, timeout=300, env=ENV):
        message = values["refused"]
        assert "LmHeadLinearAllreduce" in message and "engine='transformers'" in message, message
        torch.testing.assert_close(values["logits"], logits, rtol=1e-4, atol=1e-5)


def _lens(model) -> dict:
    layers = model.model.layers
    with model.trace(PROMPTS[0]):
        last = model.lm_head(model.model.norm(layers[1].output[:, -1])).save()      # 2-D
        row = model.lm_head(model.model.norm(layers[1].output[0])).save()          # 2-D
        tokens = model.lm_head(model.model.norm(layers[1].output[0, -1])).save()   # 1-D
    return {"last": last, "row": row, "tokens": tokens}


def _lens_and_sources(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2, engine="deepspeed")
    refused = []
    for module in (model.lm_head, model.model.layers[0].mlp.down_proj, model.model.layers[0].self_attn.q_proj):
        for op in module.source:
            try:
                with model.trace(PROMPTS[0]):
                    op.output.save()
            except MissedProviderError:
                continue  # a branch this run does not take
            except NNsightError as error:
                refused.append("tensor-parallel fragment" in str(error))
            else:
                refused.append(False)
    return {**_lens(model), "refused": refused}


def test_adhoc_lm_head_of_any_shape_and_refused_operations(reference):
    """DeepSpeed's lm_head takes 3-D inputs only; the engine lets it take what the layer it
    replaced takes (the logit lens on the last token is 2-D). The operations inside the
    swapped layers compute on slices: reading any of them is refused on every rank."""
    path, _ = reference
    want = _lens(nd.LanguageModel(path))
    for values in run_ranks(_lens_and_sources, 2, path, timeout=300, env=ENV):
        for name in want:
            torch.testing.assert_close(values[name], want[name], rtol=1e-4, atol=1e-5)
        assert values["refused"] and all(values["refused"]), values["refused"]


def test_undescribed_layers_and_their_neighbours_are_local():
    """A swapped layer of a class the engine does not describe (DeepSpeed's fused gate/up
    projection) is ``local``, and so is every module beside it (the activation computes on
    its slice); a described neighbour keeps its class's placement; its parent returns
    ``(whole)`` (its output reduced by the row-parallel layer; any other element refused),
    the model's outputs refuse their attention weights. No ranks: the placements are read from the
    modules (DeepSpeed builds its layers without a group, unsliced)."""
    from deepspeed.module_inject import layers
    from torch import nn

    from nnsight_dist import engines
    from nnsight_dist.distributed.topology import Topology

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = layers.GateUpPack_LinearLayer(nn.Linear(128, 512, bias=False), mp_group=None)
            self.act_fn = nn.SiLU()
            self.down_proj = layers.LinearAllreduce(nn.Linear(256, 128, bias=False), None)

    block = nn.Module()
    block.mlp, block.norm = MLP(), nn.LayerNorm(128)
    table = engines.get("deepspeed").placements(block, Topology(2, 0, 0, 1, 1, 2))
    got = {path: (p.input, p.output) for path, p in table.items()}
    assert got == {"model": ("whole", "{attentions: local}"), "model.mlp": ("whole", "(whole)"),
                   "model.mlp.gate_up_proj": ("local", "local"), "model.mlp.act_fn": ("local", "local"),
                   "model.mlp.down_proj": ("shard(-1)", "whole"), "model.norm": ("whole", "whole")}
    assert dict(table["model.mlp.gate_up_proj"].parameters) == {"weight": "local"}  # cut per sub-parameter
    assert dict(table["model.mlp.down_proj"].parameters) == {"weight": "shard(1)"}


def test_check_refuses_what_deepspeed_cannot_split():
    """Before anything is loaded: pp, heads tp does not divide, a model AutoTP does not
    support, and a dimension DeepSpeed's own split (``get_shard_size_list``) cuts unevenly."""
    import transformers

    from nnsight_dist import engines

    ds = engines.get("deepspeed")
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                      num_key_value_heads=4)
    ds.check(config, 2, 1)
    with pytest.raises(UnshardableModel, match="tensor-parallel only"):
        ds.check(config, 1, 2)
    with pytest.raises(UnshardableModel, match="num_key_value_heads=2"):
        ds.check(transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                          num_key_value_heads=2), 4, 1)
    with pytest.raises(UnshardableModel, match="AutoTP does not shard GPT2Config"):
        ds.check(transformers.GPT2Config(n_embd=128, n_head=4, n_layer=2), 2, 1)
    # 192 = 3 blocks of 64: DeepSpeed gives one rank 128 columns and the other 64.
    with pytest.raises(UnshardableModel, match=r"intermediate_size=192 .* \[128, 64\]"):
        ds.check(transformers.LlamaConfig(hidden_size=128, intermediate_size=192, num_attention_heads=4,
                                          num_key_value_heads=4), 2, 1)


def test_torchrun_matches_one_process(tmp_path):
    """``launch/torchrun.sh 2``, without ``LOCAL_SIZE`` (DeepSpeed's CPU kernel that needs it
    is not used): rank 0 prints the logits one process computes. AutoTP's report of the
    layers it swaps goes to stderr (DeepSpeed's own log stays where DeepSpeed puts it)."""
    path = nd.testing.make_tiny_model(str(tmp_path / "llama"))
    model = nd.LanguageModel(path)
    with model.trace(PROMPTS[0]):
        want = model.lm_head.output[0, -1, :8].save()
    script = tmp_path / "run.py"
    script.write_text(
        "import nnsight_dist as nd\n"
        f"model = nd.LanguageModel({path!r}, tp=2, engine='deepspeed')\n"
        f"with model.trace({PROMPTS[0]!r}):\n"
        "    logits = model.lm_head.output[0, -1, :8].save()\n"
        "if model.topology.rank == 0:\n"
        "    print('LOGITS', ' '.join(f'{x:.6e}' for x in logits.tolist()))\n"
    )
    # The launcher takes the checkout's .venv, else the python on PATH: this test's python.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNSIGHT_DIST_TIMEOUT": "60", "PYTHONPATH": ROOT,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for key in ("RANK", "LOCAL_SIZE"):
        env.pop(key, None)
    out = subprocess.run(["bash", "launch/torchrun.sh", "2", str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("LOGITS")]
    assert len(lines) == 1 and "AutoTP" not in out.stdout, out.stdout
    got = torch.tensor([float(x) for x in lines[0].split()[1:]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
