"""The command line under a real launcher: ``python -m nnsight_dist cache`` on 4 torchrun ranks
(tp=2 × pp=2) writes the store one process writes, and ``info`` prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import nnsight_dist as nd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [f"line {i} of the corpus: " + "the river runs " * (i % 4) for i in range(18)]


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNSIGHT_DIST_TIMEOUT": "60"}
    env.pop("RANK", None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_cache_cli_torchrun_tp2_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path / "model"), arch="llama")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    patterns = ["model.layers.*.mlp", "model.layers.0.mlp.up_proj"]
    expected = nd.collect_activations(nd.LanguageModel(path), DOCS, patterns, str(tmp_path / "ref"), batch_size=4,
                                      progress=False)
    out = tmp_path / "store"
    printed = _run(["bash", "launch/torchrun.sh", "4", "-m", "nnsight_dist", "cache", "--model", path, "--data",
                    str(data), "--modules", *patterns, "--out", str(out), "--tp", "2", "--pp", "2",
                    "--batch-size", "4", "--quiet"])
    store = nd.ActivationStore(str(out))
    assert store.modules == expected.modules and store.num_tokens == expected.num_tokens
    for name in expected.modules:
        torch.testing.assert_close(store[name][:], expected[name][:], rtol=1e-4, atol=1e-5)
    assert store.manifest["entries"]["model.layers.0.mlp.up_proj"]["shards"] == 2
    assert "model.layers.3.mlp" in printed  # rank 0 printed what the store holds, once
    assert printed.count("model.layers.3.mlp") == _run([sys.executable, "-m", "nnsight_dist", "info", str(out)]).count(
        "model.layers.3.mlp")
