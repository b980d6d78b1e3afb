"""Tests of ``store/reader.py``: stores written by hand from known whole tensors.

:func:`write_store` follows the schema of ``store/format.py`` exactly: it cuts each
entry's known whole tensor into chunks along document boundaries, splits a chunk into
tensor-parallel files (slices along the feature dimension, or integer-valued terms that
sum exactly for a ``partial`` entry), and writes the tokens chunks, a ``stats.safetensors``
computed with plain torch and the manifest. Every read is compared with indexing the
whole tensor; statistics with ``torch.mean`` / ``torch.std`` / ``torch.linalg.norm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from safetensors.torch import save as save_bytes

from nnsight_dist.store import format as fmt
from nnsight_dist.store.format import StoreError
from nnsight_dist.store.reader import READ_GAP, ActivationStore

#: Documents per chunk, per data-parallel replica (uneven, one chunk of a single document).
CHUNK_DOCS = [[6, 9, 1], [8, 6]]


@dataclass
class Spec:
    """An entry to write: its whole rows, tensor-parallel files per chunk, and the row
    dimension they are sliced along (``None`` with ``shards > 1``: partial terms)."""

    whole: torch.Tensor
    shards: int = 1
    dim: Optional[int] = None
    placement: str = "whole"


def make_specs(n: int, seed: int = 0) -> dict[str, Spec]:
    """Entries of ``n`` rows; the first feature of every float32 entry is the row's index,
    so a batch says which rows it holds."""
    g = torch.Generator().manual_seed(seed)

    def ids(t: torch.Tensor) -> torch.Tensor:
        t.flatten(1)[:, 0] = torch.arange(n, dtype=t.dtype)
        return t

    return {
        "model.layers.0.mlp": Spec(ids(torch.randn(n, 8, generator=g))),
        "model.layers.0.mlp.input": Spec(ids(torch.randn(n, 12, generator=g)), 2, 1, "shard(2)"),
        "model.layers.1.self_attn.o_proj": Spec(
            ids(torch.randint(-50, 50, (n, 8), generator=g).float()), 2, None, "partial"),
        "model.layers.1": Spec(ids(torch.randn(n, 2, 6, generator=g)), 3, 2, "(shard(3), whole)"),
        "model.norm": Spec(torch.randn(n, 4, generator=g).bfloat16()),
    }


def _split(spec: Spec, rows: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    """The tensor-parallel files of ``rows``: slices along ``dim``, or terms of a sum."""
    if spec.shards == 1:
        return [rows]
    if spec.dim is not None:
        return list(torch.tensor_split(rows, spec.shards, dim=spec.dim))
    terms = [torch.randint(-20, 20, rows.shape, generator=g).to(rows.dtype) for _ in range(spec.shards - 1)]
    return terms + [rows - sum(terms)]


def _stats(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    r = rows.double()
    return {"sum": r.sum(0), "sum_sq": (r * r).sum(0),
            "sum_sq_norm": (r.flatten(1) ** 2).sum().reshape(1)}


def write_store(root: str, specs: dict[str, Spec], doc_lengths: list[int],
                chunk_docs: list[list[int]] = CHUNK_DOCS, seed: int = 0) -> dict:
    """Write a complete store of ``specs`` (rows = the documents' tokens, in order); the
    manifest. Also returns, under ``"_tokens"``, the tokens table that was written."""
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(doc_lengths)
    table = torch.stack([
        torch.cat([torch.full((k,), d) for d, k in enumerate(doc_lengths)]),
        torch.cat([torch.arange(k) for k in doc_lengths]),
        torch.randint(0, 1000, (n,), generator=g)], dim=1)
    starts = [0]
    for k in doc_lengths:
        starts.append(starts[-1] + k)
    chunks, doc = [], 0
    for replica, per_chunk in enumerate(chunk_docs):
        for index, docs in enumerate(per_chunk):
            a, b = starts[doc], starts[doc + docs]
            files = {fmt.TOKENS: [fmt.write_chunk(root, fmt.chunk_name(fmt.TOKENS, replica, index),
                                                  {fmt.ROWS: table[a:b]})]}
            for name, spec in specs.items():
                rows = spec.whole[a:b]
                files[name] = [fmt.write_chunk(root, fmt.chunk_name(name, replica, index, t),
                                               {fmt.ROWS: part, **_stats(rows)})
                               for t, part in enumerate(_split(spec, rows, g))]
            chunks.append({"replica": replica, "index": index, "first_row": a, "rows": b - a,
                           "documents": [doc, doc + docs], "files": files})
            doc += docs
    assert doc == len(doc_lengths) and starts[-1] == n
    stats = {}
    for name, spec in specs.items():
        stats[f"{name}/count"] = torch.tensor([n], dtype=torch.long)
        stats.update({f"{name}/{k}": v for k, v in _stats(spec.whole).items()})
    data = save_bytes(stats)
    fmt.atomic_write(os.path.join(root, fmt.STATS), data)
    tp = max(s.shards for s in specs.values())
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION,
        "model": {"name": "tiny-llama", "root": "model", "config_sha256": "0" * 64},
        "data": {"fingerprint": "f" * 64, "documents": len(doc_lengths)},
        "options": {"batch_size": 4, "max_length": None, "dtype": None, "include_inputs": True,
                    "gather_tp": False, "chunk_batches": 2},
        "layout": {"world_size": tp * len(chunk_docs), "tp": tp, "pp": 1, "dp": len(chunk_docs)},
        "num_tokens": n,
        "entries": {name: {"module": name.removesuffix(".input"),
                           "key": "input" if name.endswith(".input") else "output",
                           "shape": list(spec.whole.shape[1:]), "dtype": fmt.dtype_name(spec.whole.dtype),
                           "placement": spec.placement, "dim": spec.dim, "shards": spec.shards,
                           "owner_stage": None}
                    for name, spec in specs.items()},
        "chunks": chunks,
        "stats": {"file": fmt.STATS, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                  "rows": n},
    }
    fmt.write_json(os.path.join(root, fmt.RUN), {"modules": list(specs)})
    fmt.write_json(os.path.join(root, fmt.MANIFEST), manifest)
    return {**manifest, "_tokens": table}


def _doc_lengths(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 40, (sum(map(sum, CHUNK_DOCS)),), generator=g).tolist()


def _build(root: str) -> tuple[ActivationStore, dict[str, Spec], dict]:
    lengths = _doc_lengths()
    specs = make_specs(sum(lengths))
    written = write_store(root, specs, lengths)
    return ActivationStore(root), specs, written


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("store")))


@pytest.fixture
def fresh(tmp_path):
    """A store of its own, to damage."""
    return _build(str(tmp_path / "store"))


def _chunk_file(written: dict, chunk: int, name: str, tp: int = 0) -> str:
    return written["chunks"][chunk]["files"][name][tp]["file"]


# ---------------------------------------------------------------------------- opening


def test_open_properties(built):
    store, specs, written = built
    n = sum(_doc_lengths())
    on_disk = json.load(open(os.path.join(store.path, fmt.MANIFEST)))
    assert store.modules == list(on_disk["entries"]) and sorted(store.modules) == sorted(specs)
    assert store.num_tokens == n and len(store) == len(specs)
    assert store.manifest["num_tokens"] == n
    for name in specs:
        assert name in store and "model." + name in store
        assert store[name] is store["model." + name]
        assert store[name].shape == tuple(specs[name].whole.shape)
        assert store[name].dtype == specs[name].whole.dtype
        assert len(store[name]) == n
    assert "model.layers.7.mlp" not in store and 3 not in store
    assert f"{len(specs)} entries, {n} tokens" in repr(store)


def test_unknown_entry_is_a_key_error_listing_names(built):
    store = built[0]
    with pytest.raises(KeyError, match=r"model\.layers\.7\.mlp.*model\.layers\.0\.mlp"):
        store["model.layers.7.mlp"]
    with pytest.raises(KeyError, match="5 entries"):
        store.stats("nope")


def test_missing_manifest(tmp_path, fresh):
    root = fresh[0].path
    os.remove(os.path.join(root, fmt.MANIFEST))
    with pytest.raises(StoreError, match=r"did not finish; rerun collect_activations with resume=True"):
        ActivationStore(root)
    os.remove(os.path.join(root, fmt.RUN))
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(root)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("field,value,message", [("format", "something.else", "not an activation store"),
                                                  ("version", 99, "version 99")])
def test_wrong_format_or_version(fresh, field, value, message):
    path = os.path.join(fresh[0].path, fmt.MANIFEST)
    manifest = json.load(open(path))
    manifest[field] = value
    fmt.write_json(path, manifest)
    with pytest.raises(StoreError, match=message):
        ActivationStore(fresh[0].path)


# ---------------------------------------------------------------------------- indexing


def _forms(n: int) -> list:
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(n, generator=g) < 0.3
    return [
        0, n - 1, -1, -n, n // 2, torch.tensor(7),
        slice(None), slice(3, 17), slice(100, 300), slice(-10, None), slice(5, 5), slice(n - 3, n + 50),
        slice(None, None, 3), slice(None, None, -2), slice(250, 10, -7), slice(1, n, 97),
        [0, 5, 5, -1, 200, 3, 3], [], torch.randperm(n, generator=g)[:50], torch.randperm(n, generator=g),
        torch.tensor([n - 1, 0, 400, 0]), list(range(0, n, 150)),  # far apart: one read per row
        mask, mask.tolist(),
    ]


@pytest.mark.parametrize("name", list(make_specs(4)))
def test_indexing_forms_match_the_whole_tensor(built, name):
    store, specs, _ = built
    entry, whole = store[name], specs[name].whole
    for rows in _forms(len(whole)):
        got = entry[rows]
        if isinstance(rows, slice) and (rows.step or 1) < 0:  # torch has no negative steps
            want = whole[torch.tensor(list(range(len(whole))[rows]), dtype=torch.long)]
        elif isinstance(rows, list):
            want = whole[torch.tensor(rows, dtype=torch.bool if rows and isinstance(rows[0], bool)
                                      else torch.long)]
        else:
            want = whole[rows]
        assert got.dtype == want.dtype and got.shape == want.shape, rows
        assert torch.equal(got, want), rows


def test_index_errors_match_tensor_indexing(built):
    store, specs, _ = built
    entry, n = store["model.layers.0.mlp"], store.num_tokens
    for bad in (n, -n - 1, [0, n], torch.tensor([-n - 1])):
        with pytest.raises(IndexError):
            specs["model.layers.0.mlp"].whole[bad]
        with pytest.raises(IndexError, match="out of range"):
            entry[bad]
    with pytest.raises(IndexError, match="mask"):
        entry[torch.ones(n - 1, dtype=torch.bool)]
    with pytest.raises(TypeError):
        entry[0, 1]


def test_reads_only_the_chunks_asked_for(built, monkeypatch):
    store, specs, written = built
    seen = []
    real = fmt.read_spans
    monkeypatch.setattr(fmt, "read_spans", lambda root, record, spans:
                        seen.append((record["file"], list(spans))) or real(root, record, spans))
    first = written["chunks"][1]["first_row"]
    store["model.layers.1"][first + 2:first + 5]
    assert seen == [(_chunk_file(written, 1, "model.layers.1", t), [(2, 5)]) for t in range(3)]
    # Rows of one chunk: gaps up to READ_GAP read in one span, a longer gap starts another.
    assert written["chunks"][1]["rows"] > 2 * READ_GAP + 5
    seen.clear()
    rows = [first + 2 * READ_GAP + 4, first + 1, first + 3, first + 3, first + 3 + READ_GAP]
    assert torch.equal(store["model.layers.0.mlp"][rows], specs["model.layers.0.mlp"].whole[rows])
    assert seen == [(_chunk_file(written, 1, "model.layers.0.mlp"),
                     [(1, 4 + READ_GAP), (2 * READ_GAP + 4, 2 * READ_GAP + 5)])]


# ---------------------------------------------------------------------------- batches


def _ids(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(batches).flatten(1)[:, 0].long()


@pytest.mark.parametrize("name", ["model.layers.0.mlp", "model.layers.0.mlp.input",
                                  "model.layers.1.self_attn.o_proj", "model.norm"])
def test_batches_in_order(built, name):
    store, specs, _ = built
    whole, n = specs[name].whole, store.num_tokens
    batches = list(store.iter_batches(name, batch_size=37, shuffle=False))
    assert [len(b) for b in batches] == [37] * (n // 37) + ([n % 37] if n % 37 else [])
    assert torch.equal(torch.cat(batches), whole)
    kept = list(store.iter_batches(name, batch_size=37, shuffle=False, drop_last=True))
    assert len(kept) == n // 37 and torch.equal(torch.cat(kept), whole[:n // 37 * 37])


@pytest.mark.parametrize("name", ["model.layers.0.mlp", "model.layers.1.self_attn.o_proj", "model.layers.1"])
@pytest.mark.parametrize("buffer_rows", [None, 40])
def test_shuffled_batches_cover_every_row_once(built, name, buffer_rows):
    store, specs, _ = built
    whole, n = specs[name].whole, store.num_tokens
    it = store.iter_batches(name, batch_size=16, seed=5, buffer_rows=buffer_rows)
    batches = list(it)
    assert len(batches) == len(it) and all(len(b) == 16 for b in batches[:-1])
    ids = _ids(batches)
    assert torch.equal(ids.sort().values, torch.arange(n))  # every row exactly once
    assert not torch.equal(ids, torch.arange(n))             # and not in store order
    assert torch.equal(torch.cat(batches), whole[ids])       # whole rows, not mixed up
    assert it.peak_rows <= it.buffer_rows
    if buffer_rows is not None:
        assert it.buffer_rows == buffer_rows and it.peak_rows == buffer_rows


def test_shuffle_is_a_function_of_the_seed(built):
    store = built[0]
    run = lambda seed: _ids(list(store.iter_batches("model.layers.0.mlp", batch_size=32, seed=seed)))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_shuffled_drop_last(built):
    store, _, _ = built
    n = store.num_tokens
    batches = list(store.iter_batches("model.layers.0.mlp", batch_size=50, seed=0, drop_last=True))
    assert len(batches) == n // 50 and all(len(b) == 50 for b in batches)
    assert len(set(_ids(batches).tolist())) == n // 50 * 50


def test_shuffle_buffer_is_bounded(built, monkeypatch):
    """The default bound is max(8 * batch_size, the two largest chunks), never above the
    store; no read brings in more rows than the buffer holds."""
    store, _, written = built
    sizes = sorted((c["rows"] for c in written["chunks"]), reverse=True)
    assert store.iter_batches("model.layers.0.mlp", batch_size=8).buffer_rows == sizes[0] + sizes[1]
    assert store.iter_batches("model.layers.0.mlp", batch_size=60).buffer_rows == min(480, store.num_tokens)
    largest = []
    real = fmt.read_spans

    def spy(root, record, spans):
        out = real(root, record, spans)
        largest.append(max(len(t) for t in out))
        return out

    monkeypatch.setattr(fmt, "read_spans", spy)
    it = store.iter_batches("model.layers.0.mlp.input", batch_size=10, seed=3, buffer_rows=25)
    assert sum(len(b) for b in it) == store.num_tokens
    assert it.peak_rows == 25 and max(largest) <= 25
    with pytest.raises(ValueError, match="must hold a batch"):
        store.iter_batches("model.layers.0.mlp", batch_size=10, buffer_rows=9)


# ---------------------------------------------------------------------------- tokens, stats


def test_tokens(built):
    store, _, written = built
    tokens = store.tokens()
    table = written["_tokens"]
    for i, key in enumerate(("document", "position", "token_id")):
        assert tokens[key].dtype == torch.long and torch.equal(tokens[key], table[:, i])


@pytest.mark.parametrize("name", list(make_specs(4)))
def test_stats_match_torch(built, name):
    store, specs, _ = built
    whole = specs[name].whole.double()
    s = store.stats("model." + name)
    assert s["count"] == len(whole)
    torch.testing.assert_close(s["mean"], torch.mean(whole, dim=0))
    torch.testing.assert_close(s["std"], torch.std(whole, dim=0, correction=0))
    expected_norm = torch.linalg.norm(whole.flatten(1), dim=1).pow(2).mean().sqrt().item()
    assert s["norm"] == pytest.approx(expected_norm, rel=1e-12)
    assert s["mean"].dtype == s["std"].dtype == torch.float64


# ---------------------------------------------------------------------------- verify, damage


def test_verify_good_store(built):
    store, specs, written = built
    summary = store.verify()
    chunks = written["chunks"]
    assert summary["files"] == len(chunks) * (1 + sum(s.shards for s in specs.values())) + 1
    files = [r["file"] for c in chunks for rs in c["files"].values() for r in rs] + [fmt.STATS]
    assert summary["bytes"] == sum(os.path.getsize(os.path.join(store.path, f)) for f in files)
    assert store.verify(progress=True) == summary


def test_truncated_chunk(fresh):
    store, specs, written = fresh
    name = "model.layers.0.mlp.input"
    bad = _chunk_file(written, 2, name, tp=1)
    path = os.path.join(store.path, bad)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(StoreError, match=rf"{bad}.*\(1 of \d+ files bad"):
        store.verify()
    first, rows = written["chunks"][2]["first_row"], written["chunks"][2]["rows"]
    with pytest.raises(StoreError, match=rf"{bad} has .* bytes.*truncated"):
        store[name][first + rows - 1]
    with pytest.raises(StoreError, match=bad):
        list(store.iter_batches(name))
    assert torch.equal(store[name][:first], specs[name].whole[:first])  # other chunks still read


def test_flipped_byte(fresh):
    store, _, written = fresh
    bad = [_chunk_file(written, 3, "model.layers.1.self_attn.o_proj", 0), fmt.STATS]
    for rel in bad:
        path = os.path.join(store.path, rel)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size - 3)
            byte = f.read(1)
            f.seek(size - 3)
            f.write(bytes([byte[0] ^ 0x40]))
        assert os.path.getsize(path) == size
    with pytest.raises(StoreError, match=rf"{bad[0]} has the recorded size but not the recorded sha256.*"
                                         r"\(2 of \d+ files bad"):
        store.verify()


def test_missing_chunk(fresh):
    store, _, written = fresh
    bad = _chunk_file(written, 0, fmt.TOKENS)
    os.remove(os.path.join(store.path, bad))
    with pytest.raises(StoreError, match=rf"{bad} is missing"):
        store.verify()
    with pytest.raises(StoreError, match=rf"{bad} is missing"):
        store.tokens()


# ---------------------------------------------------------------------------- describe, CLI


def test_describe(built):
    store, specs, _ = built
    text = store.describe()
    for name, spec in specs.items():
        line = next(l for l in text.splitlines() if l.split() and l.split()[0] == name)
        assert str(tuple(spec.whole.shape)).replace(" ", "") in line.replace(" ", "")
        assert fmt.dtype_name(spec.whole.dtype) in line
    assert "3 shards, dim 2" in text and "2 partial terms" in text
    assert f"{store.num_tokens} from {len(_doc_lengths())} documents" in text
    assert "tp=3" in text and "dp=2" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    return subprocess.run([sys.executable, "-m", "nnsight_dist", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_info(built, tmp_path):
    store, specs, _ = built
    out = _cli("info", store.path, "--verify")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(store.describe())
    assert all(name in out.stdout for name in specs) and "verified" in out.stdout
    damaged = str(tmp_path / "damaged")
    shutil.copytree(store.path, damaged)
    os.remove(os.path.join(damaged, fmt.STATS))
    out = _cli("info", damaged, "--verify")
    assert out.returncode == 1 and "stats.safetensors is missing" in out.stderr
