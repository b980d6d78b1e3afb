"""collect_activations on real forked ranks: tp=2, pp=2, tp=2 × pp=2 and tp=2 × dp=2 stores
read back equal to the single-process store of the same weights; a rank killed mid-collection,
then a rerun, ends byte-identical to an uninterrupted run; errors raise on every rank."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import nnsight_dist as nd
from helpers import tree_digest
from nnsight_dist.testing.ranks import run_ranks

DOCS = [f"text {i}: " + " ".join(["alpha", "tower", "paris", "the", "river"][j % 5] for j in range(i % 11))
        for i in range(26)]
PATTERNS = ["model.layers.*.mlp", "model.layers.1.self_attn", "model.layers.2.mlp.up_proj",
            "model.layers.3.mlp.down_proj", "model.norm"]
TOPOLOGIES = {  # name: (world, tp, pp)
    "tp2": (2, 2, 1),
    "pp2": (2, 1, 2),
    "tp2_pp2": (4, 2, 2),
    "tp2_dp2": (4, 2, 1),
}
OPTIONS = dict(batch_size=4, chunk_batches=2, include_inputs=True, progress=False)
ENV = {"NNSIGHT_DIST_TIMEOUT": "60"}


def _collect(rank: int, path: str, tp: int, pp: int, out: str, options: dict) -> int:
    model = nd.LanguageModel(path, tp=tp, pp=pp)
    return nd.collect_activations(model, DOCS, PATTERNS, out, **options).num_tokens



@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    path = nd.testing.make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch=request.param)
    out = str(tmp_path_factory.mktemp("ref") / "store")
    return path, nd.collect_activations(nd.LanguageModel(path), DOCS, PATTERNS, out, **OPTIONS)


@pytest.mark.parametrize("gather_tp", [False, True], ids=["shards", "gathered"])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_store_equals_one_process(reference, topology, gather_tp, tmp_path):
    path, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    if gather_tp and tp == 1:
        pytest.skip("nothing to gather at tp=1")
    out = str(tmp_path / "store")
    counts = run_ranks(_collect, world, path, tp, pp, out, {**OPTIONS, "gather_tp": gather_tp}, timeout=240, env=ENV)
    assert counts == [expected.num_tokens] * world
    store = nd.ActivationStore(out)
    assert store.modules == expected.modules
    assert store.num_tokens == expected.num_tokens
    assert set(expected.tokens()) == {"document", "position", "token_id"}
    for column, values in expected.tokens().items():
        assert torch.equal(store.tokens()[column], values), column
    for name in expected.modules:
        torch.testing.assert_close(store[name][:], expected[name][:], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        want, got = expected.stats(name), store.stats(name)
        torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-4, atol=1e-6)
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-4)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    shards = {n: e["shards"] for n, e in manifest["entries"].items()}
    # Written once per tensor-parallel group unless a shard: column-parallel outputs and
    # row-parallel inputs are shards at tp=2 (unless gathered), the rest one file per chunk.
    sharded = {"model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj.input"} if tp == 2 and not gather_tp else set()
    assert {n for n, k in shards.items() if k > 1} == sharded
    assert all(k == 1 for n, k in shards.items() if n not in sharded)
    store.verify()


def _killed(rank: int, path: str, out: str, victim: int, after: int) -> int:
    """Collect at tp=2 × pp=2; ``victim`` dies once ``after`` chunks are written."""
    from nnsight_dist.store import writer

    if rank == victim:
        ends = writer.ChunkWriter.end_chunk

        def end_chunk(self):
            ends(self)
            self.ended = getattr(self, "ended", 0) + 1
            if self.ended == after:
                self.close()  # written: the rerun must keep them as they are
                os._exit(3)  # no clean-up, as a crash

        writer.ChunkWriter.end_chunk = end_chunk
    return _collect(rank, path, 2, 2, out, OPTIONS)


def test_killed_rank_then_rerun_is_byte_identical_tp2_pp2(reference, tmp_path):
    path, _ = reference
    whole = str(tmp_path / "whole")
    run_ranks(_collect, 4, path, 2, 2, whole, OPTIONS, timeout=240, env=ENV)
    out = str(tmp_path / "resumed")
    results = run_ranks(_killed, 4, path, out, 3, 2, timeout=240, env={"NNSIGHT_DIST_TIMEOUT": "20"},
                        expect_errors=True)
    assert results[3] == ("died", 3)
    assert all(r[0] == "error" for i, r in enumerate(results) if i != 3), results
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    kept = tree_digest(out)
    run_ranks(_collect, 4, path, 2, 2, out, OPTIONS, timeout=240, env=ENV)
    final = tree_digest(out)
    assert final == tree_digest(whole)
    written_before = {f for f in kept if f.startswith("model.layers.3") and f.endswith(".json")}
    assert written_before and all(kept[f] == final[f] for f in written_before)


def _bad_pattern(rank: int, path: str, out: str) -> str:
    model = nd.LanguageModel(path, tp=2, pp=1)
    try:
        nd.collect_activations(model, DOCS, ["model.layers.*.mpl"], out, progress=False)
    except nd.StoreError as e:
        return str(e)
    return "no error"


def test_errors_raise_on_every_rank_tp2(reference, tmp_path):
    path, _ = reference
    messages = run_ranks(_bad_pattern, 2, path, str(tmp_path / "s"), timeout=120, env=ENV)
    assert all("matches no module" in m for m in messages) and messages[0] == messages[1]
    assert not os.path.exists(tmp_path / "s")
    shutil.rmtree(tmp_path, ignore_errors=True)


def _disk_full(rank: int, path: str, tp: int, pp: int, out: str, victim: int) -> tuple[str, str, float]:
    """Collect; on ``victim`` the second chunk's files cannot be written (a full disk)."""
    import time

    from nnsight_dist.store import writer

    if rank == victim:
        write = writer.write_chunk

        def full(root, name, tensors):
            if "-c000001" in name:
                raise OSError(28, "No space left on device")
            return write(root, name, tensors)

        writer.write_chunk = full
    start = time.monotonic()
    try:
        _collect(rank, path, tp, pp, out, OPTIONS)
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "ok", "", time.monotonic() - start


@pytest.mark.parametrize("topology", ["pp2", "tp2_pp2", "tp2_dp2"])
def test_write_error_on_one_rank_ends_every_rank_then_resumes(reference, topology, tmp_path):
    path, expected = reference
    world, tp, pp = TOPOLOGIES[topology]
    out = str(tmp_path / "store")
    victim = world - 1
    results = run_ranks(_disk_full, world, path, tp, pp, out, victim, timeout=240, env=ENV)
    for rank, (kind, message, seconds) in enumerate(results):
        assert "No space left on device" in message, (rank, kind, message)
        assert kind == ("OSError" if rank == victim else "RemoteError"), (rank, kind)
        assert seconds < 30, f"rank {rank} took {seconds:.1f} s to raise"  # not a timeout (60 s)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    run_ranks(_collect, world, path, tp, pp, out, OPTIONS, timeout=240, env=ENV)
    store = nd.ActivationStore(out)
    for name in expected.modules:
        torch.testing.assert_close(store[name][:], expected[name][:], rtol=1e-4, atol=1e-5)
