"""``nd.plan`` and ``python -m nnsight_dist plan``: a sharding planned on the meta device.

The plan is checked against independent computations: Llama-3-70B's parameter bytes per
rank counted by formula from its configuration, and, for tiny models, the placements and
the parameter bytes of the same model loaded on forked ranks (``model.placements()`` and
the local tensors each rank holds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import transformers

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def llama3_70b() -> transformers.LlamaConfig:
    """Meta-Llama-3-70B's configuration (its config.json), without weights."""
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "nnsight_dist", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_llama3_70b_bytes_per_rank():
    config = llama3_70b()
    start = time.monotonic()
    plan = nd.plan(config, tp=8, pp=2, dtype="bfloat16")
    seconds = time.monotonic() - start
    assert seconds < 10, f"planning 70B took {seconds:.1f} s"

    # The parameters by formula, and what tp=8 divides (the plan: attention and MLP
    # projections, the embedding's and lm_head's vocabulary; norms are replicated).
    tp, size = 8, 2
    h, inter, vocab, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    q = o = h * config.num_attention_heads * head_dim
    k = v = h * config.num_key_value_heads * head_dim
    mlp = 3 * h * inter
    sharded_layer, norms_layer = q + k + v + o + mlp, 2 * h
    embed = head = vocab * h
    expected = {}
    for rank in range(16):
        stage = rank // tp
        count = layers // 2 * (sharded_layer // tp + norms_layer)  # pp=2: half the layers per stage
        count += embed // tp if stage == 0 else head // tp + h
        expected[rank] = count * size
    assert plan.parameter_bytes == expected

    total = embed + layers * (sharded_layer + norms_layer) + h + head
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(config)
    assert total == sum(p.numel() for p in built.parameters())  # the formula counts the model
    replicated = layers * norms_layer + h
    assert sum(plan.parameter_bytes.values()) == (total + (tp - 1) * replicated) * size

    # Per token: hidden states whole; the MLP's intermediate is a slice of intermediate / tp.
    assert plan.activations["hidden_states"] == h * size
    assert plan.activations["intermediate"]["bytes"] == inter // tp * size
    assert plan.activations["intermediate"]["path"].startswith("model.model.layers.0.mlp.")
    attn = plan.placements["model.model.layers.0.self_attn"]
    assert (attn.owner_stage, attn.ranks, attn.output) == (0, tuple(range(8)), "(whole, shard(1))")
    assert plan.placements["model.model.layers.40"].owner_stage == 1


def test_cli_prints_70b_table(tmp_path):
    path = tmp_path / "config.json"
    llama3_70b().to_json_file(str(path))
    probe = ("import time, sys; from nnsight_dist.cli.plan import main_plan; import transformers; "
             "t = time.monotonic(); code = main_plan(sys.argv[1:]); "
             "print(f'SECONDS {time.monotonic() - t:.2f}'); sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe, str(path), "--tp", "8", "--pp", "2", "--dtype", "bfloat16"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    seconds = float(out.stdout.rsplit("SECONDS", 1)[1])
    assert seconds < 10, f"the plan command took {seconds:.1f} s after import"
    expected = nd.plan(str(path), tp=8, pp=2, dtype="bfloat16")
    text = out.stdout.rsplit("SECONDS", 1)[0].strip()
    assert text == str(expected)
    assert "model.model.layers.{0..39}.self_attn " in text and "model.model.layers.{40..79}.mlp.down_proj " in text
    assert len(text.splitlines()) < 60  # 80 layers, grouped
    assert f"({expected.parameter_bytes[0]} bytes) each" in text

    js = _cli(str(path), "--tp", "8", "--pp", "2", "--dtype", "bfloat16", "--json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == json.loads(json.dumps(expected.to_json()))


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    paths = {arch: nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(arch)), arch=arch, heads=4, kv_heads=2)
             for arch in ("llama", "qwen2")}
    # The llama with its embedding and lm_head tied: one tensor, held by both end stages.
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["llama"])
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    paths["llama_tied"] = str(tmp_path_factory.mktemp("llama_tied"))
    model.save_pretrained(paths["llama_tied"])
    transformers.AutoTokenizer.from_pretrained(paths["llama"]).save_pretrained(paths["llama_tied"])
    return paths


def _loaded(rank: int, path: str, tp: int, pp: int) -> dict:
    from torch.distributed.tensor import DTensor

    model = nd.LanguageModel(path, tp=tp, pp=pp)
    held = {}
    for param in model._module.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        held[id(param)] = local.numel() * local.element_size()
    table = {path: [p.owner_stage, list(p.ranks), p.input, p.output] for path, p in model.placements().items()}
    return {"placements": json.dumps(table), "bytes": sum(held.values())}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_tied"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_plan_matches_loaded_ranks(tiny_paths, arch, tp, pp):
    path = tiny_paths[arch]
    plan = nd.plan(path, tp=tp, pp=pp)
    planned = {p: [v.owner_stage, list(v.ranks), v.input, v.output] for p, v in plan.placements.items()}
    results = run_ranks(_loaded, tp * pp, path, tp, pp, timeout=300, env={"NNSIGHT_DIST_TIMEOUT": "120"})
    for rank, got in enumerate(results):
        table = json.loads(got["placements"])
        assert table.keys() == planned.keys(), f"rank {rank}: paths differ"
        for p in table:
            assert table[p] == planned[p], f"rank {rank} {p}: loaded {table[p]}, planned {planned[p]}"
        assert got["bytes"] == plan.parameter_bytes[rank], f"rank {rank}: parameter bytes"


def test_refusals(tmp_path, capsys):
    from nnsight_dist.cli.plan import main_plan

    cases = {  # config, degrees, what the reason names
        "heads": (transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=64,
                                           intermediate_size=96, num_hidden_layers=2), {"tp": 3}, "num_attention_heads=4"),
        "kv heads": (transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                              intermediate_size=96, num_hidden_layers=2), {"tp": 4}, "num_key_value_heads=2"),
        "layers": (transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=64,
                                            intermediate_size=96, num_hidden_layers=2), {"pp": 3}, "exceeds the 2 layers"),
    }
    for name, (config, degrees, reason) in cases.items():
        with pytest.raises(nd.UnshardableModel, match=reason):
            nd.plan(config, **degrees)
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        config.to_json_file(str(path))
        args = [a for k, v in degrees.items() for a in (f"--{k}", str(v))]
        if name == "heads":  # the command as a user runs it; the others through its function
            out = _cli(str(path), *args)
            status, stdout, stderr = out.returncode, out.stdout, out.stderr
        else:
            status = main_plan([str(path), *args])
            stdout, stderr = capsys.readouterr()
        assert status == 2, (name, stdout, stderr)
        assert reason in stderr and stderr.startswith("refused: ") and stdout == "", (name, stderr)
    with pytest.raises(nd.TopologyError, match="positive integer"):
        nd.plan(cases["heads"][0], tp=0)
