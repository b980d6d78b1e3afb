"""Tests for nnsight_dist.testing.make_tiny_model (offline, CPU, fast)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nnsight_dist.testing import make_tiny_model
from nnsight_dist.testing.tiny import MARKER_FILE, SPECIAL_TOKEN, SPECIAL_TOKEN_ID

ARCHS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHS)
def test_build_load_forward(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / arch
    assert make_tiny_model(out, arch=arch) == out
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", MARKER_FILE):
        assert (out / name).is_file(), name

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 512
    assert len(tok) <= model.config.vocab_size

    # special tokens agree between tokenizer and config
    for attr in ("bos", "eos", "pad"):
        assert getattr(tok, f"{attr}_token") == SPECIAL_TOKEN
        assert getattr(tok, f"{attr}_token_id") == SPECIAL_TOKEN_ID
        assert getattr(model.config, f"{attr}_token_id") == SPECIAL_TOKEN_ID
    assert tok.unk_token_id == SPECIAL_TOKEN_ID

    ids = tok("Hello world")["input_ids"]
    assert len(ids) >= 2
    assert SPECIAL_TOKEN_ID not in ids  # nothing unknown
    assert tok.decode(ids) == "Hello world"

    batch = tok(["Hello world, this is a test.", "The capital of France is"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    b, s = batch["input_ids"].shape
    assert logits.shape == (b, s, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_architecture_sizes(tmp_path: Path) -> None:
    from transformers import AutoConfig

    make_tiny_model(tmp_path / "l", arch="llama", layers=2, hidden=64, heads=8,
                    kv_heads=2, intermediate=96, vocab=300)
    cfg = AutoConfig.from_pretrained(tmp_path / "l")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 64, 8, 2, 96, 300)
    assert cfg.tie_word_embeddings is False

    make_tiny_model(tmp_path / "g", arch="gpt2", layers=3, hidden=64, heads=2,
                    kv_heads=3, intermediate=80, vocab=400)
    cfg = AutoConfig.from_pretrained(tmp_path / "g")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.vocab_size,
            cfg.n_positions) == (3, 64, 2, 80, 400, 256)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic(tmp_path: Path, arch: str) -> None:
    a = _file_bytes(Path(make_tiny_model(tmp_path / "a", arch=arch, seed=3)))
    b = _file_bytes(Path(make_tiny_model(str(tmp_path / "b"), arch=arch, seed=3)))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between builds"


def test_seed_changes_weights_only(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=0)
    b = make_tiny_model(tmp_path / "b", seed=1)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_weights_well_scaled(tmp_path: Path) -> None:
    w = load_file(make_tiny_model(tmp_path / "m") / "model.safetensors")
    emb = w["model.embed_tokens.weight"]
    assert emb.dtype == torch.float32
    assert 0.015 < emb.std().item() < 0.025
    assert torch.equal(w["model.norm.weight"], torch.ones_like(w["model.norm.weight"]))


def test_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    make_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(5), expected)


def test_reuse_only_when_identical(tmp_path: Path) -> None:
    out = tmp_path / "m"
    make_tiny_model(out, seed=0)
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    make_tiny_model(out, seed=0)  # identical -> reused
    assert weights.stat().st_mtime_ns == mtime

    before = weights.read_bytes()
    make_tiny_model(out, seed=1)  # different -> rebuilt
    assert weights.read_bytes() != before
    assert json.loads((out / MARKER_FILE).read_text())["args"]["seed"] == 1

    # a damaged build (missing weights) is rebuilt even with identical args
    weights.unlink()
    make_tiny_model(out, seed=1)
    assert weights.is_file()


def test_invalid_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama, gpt2, qwen2"):
        make_tiny_model(tmp_path, arch="mistral")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=130, heads=4), "divisible by heads"),
        (dict(heads=4, kv_heads=3), "divisible by kv_heads"),
        (dict(layers=0), "layers must be a positive int"),
        (dict(hidden=-128), "hidden must be a positive int"),
        (dict(intermediate=1.5), "intermediate must be a positive int"),
        (dict(vocab=100), "vocab must be >= 257"),
    ],
)
def test_invalid_sizes(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_gpt2_ignores_kv_heads(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", arch="gpt2", kv_heads=4)
    b = make_tiny_model(tmp_path / "b", arch="gpt2", kv_heads=0)
    assert _file_bytes(a) == _file_bytes(b)
