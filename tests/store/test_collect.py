"""collect_activations in one process: values against plain transformers with hooks, the
token index, statistics, resume after damage, and the errors raised before any work."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

import nnsight_dist as nd
from helpers import tree_digest
from nnsight_dist.store.data import Documents, replica_range

DOCS = [f"document {i} says " + " ".join(["word", "tower", "paris", "the"][j % 4] for j in range(i % 9)) for i in range(22)]
PATTERNS = ["model.layers.*.mlp", "model.layers.1.self_attn", "model.layers.2.mlp.down_proj", "model.norm"]


def hooked_rows(path: str, docs: list[str], modules: list[str], batch_size: int, inputs: bool) -> dict:
    """Per entry, the rows of the real tokens from plain transformers with forward hooks,
    batched and left-padded as a LanguageModel pads (position ids counted from the mask)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    found: dict[str, list] = {}
    handles = []
    for name in modules:
        module = ref.get_submodule(name)

        def hook(m, args, kwargs, out, name=name):
            first = args[0] if args else next(iter(kwargs.values()))
            found.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)
            if inputs:
                found.setdefault(name + ".input", []).append(first)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    rows: dict[str, list] = {}
    tokens = []
    for start in range(0, len(docs), batch_size):
        ids = [tok(d)["input_ids"] for d in docs[start:start + batch_size]]
        width = max(len(r) for r in ids)
        x = torch.full((len(ids), width), tok.pad_token_id or 0)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, r in enumerate(ids):
            x[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        found.clear()
        with torch.no_grad():
            ref(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        keep = mask.bool()
        for name, values in found.items():
            rows.setdefault(name, []).append(values[0][keep])
        doc = torch.arange(start, start + len(ids))[:, None].expand_as(x)
        tokens.append(torch.stack([doc[keep], (mask.cumsum(1) - 1)[keep], x[keep]], 1))
    for h in handles:
        h.remove()
    return {"tokens": torch.cat(tokens), **{k: torch.cat(v) for k, v in rows.items()}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("llama")), arch="llama")


@pytest.fixture(scope="module")
def model(tiny):
    return nd.LanguageModel(tiny)


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    return nd.collect_activations(model, DOCS, PATTERNS, str(out), batch_size=4, chunk_batches=2,
                                  include_inputs=True, progress=False)



def test_values_equal_hooked_transformers(tiny, store):
    expected = hooked_rows(tiny, DOCS, ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.1.self_attn",
                                        "model.layers.2.mlp.down_proj", "model.norm"], 4, inputs=True)
    assert store.num_tokens == expected["tokens"].shape[0]
    toks = store.tokens()
    torch.testing.assert_close(torch.stack([toks["document"], toks["position"], toks["token_id"]], 1), expected["tokens"])
    names = set(store.modules)
    for name, want in expected.items():
        if name == "tokens":
            continue
        assert name in names, (name, sorted(names))
        torch.testing.assert_close(store[name][:], want, rtol=1e-5, atol=1e-6)


def test_stats_equal_torch(store):
    x = store["model.layers.1.mlp"][:].double()
    s = store.stats("model.layers.1.mlp")
    assert s["count"] == x.shape[0]
    torch.testing.assert_close(s["mean"], x.mean(0))
    torch.testing.assert_close(s["std"], x.std(0, unbiased=False))
    assert s["norm"] == pytest.approx(x.pow(2).sum(1).mean().sqrt().item(), rel=1e-9)


def test_manifest_names_the_run(store, tiny):
    manifest = json.load(open(os.path.join(store.path, "manifest.json")))
    assert manifest["data"]["fingerprint"] == Documents(DOCS).fingerprint
    assert manifest["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}
    assert [c["index"] for c in manifest["chunks"]] == list(range(3))  # 22 docs / (4 × 2) per chunk
    assert store.verify()["files"] >= 3 * (1 + 2 * 5)


def test_data_files_give_the_same_store(model, store, tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(DOCS) + "\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    for source in (str(txt), str(jsonl)):
        out = tmp_path / os.path.basename(source).replace(".", "_")
        got = nd.collect_activations(model, source, PATTERNS, str(out), batch_size=4, chunk_batches=2,
                                     include_inputs=True, progress=False)
        assert tree_digest(str(out)) == tree_digest(store.path)
        assert got.num_tokens == store.num_tokens


def test_resume_repairs_damage_byte_identically(model, store, tmp_path):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(store.path, out)
    chunk = out / "model.layers.1.mlp" / "r0000-c000001-t00.safetensors"
    with open(chunk, "r+b") as f:  # a crash mid-write: the file cut short
        f.truncate(os.path.getsize(chunk) // 2)
    os.remove(out / "manifest.json")
    os.remove(out / "tokens" / "r0000-c000002.safetensors.json")  # a chunk whose sidecar never came
    (out / "model.norm" / "r0000-c000000-t00.safetensors.tmp999").write_bytes(b"partial")
    nd.collect_activations(model, DOCS, PATTERNS, str(out), batch_size=4, chunk_batches=2, include_inputs=True,
                           progress=False)
    assert tree_digest(str(out)) == tree_digest(store.path)


def test_truncated_chunk_is_named(store, tmp_path):
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(store.path, out)
    chunk = out / "model.layers.0.mlp" / "r0000-c000000-t00.safetensors"
    with open(chunk, "r+b") as f:
        f.truncate(100)
    damaged = nd.ActivationStore(str(out))
    with pytest.raises(nd.StoreError, match="r0000-c000000-t00"):
        damaged.verify()
    with pytest.raises(nd.StoreError, match="r0000-c000000-t00"):
        damaged["model.layers.0.mlp"][0]


@pytest.mark.parametrize("bad, match", [
    (["model.layers.*.nope"], "matches no module"),
    (["model.layers.9"], "matches no module"),
    (["model.layers.0.mlp.act_fn", 3], "strings"),
])
def test_bad_patterns_fail_before_any_work(model, tmp_path, bad, match):
    out = tmp_path / "never"
    with pytest.raises(nd.StoreError, match=match):
        nd.collect_activations(model, DOCS, bad, str(out), progress=False)
    assert not out.exists()


def test_patterns_match_within_one_level_in_model_order(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path / "deep"), arch="llama", layers=12)
    got = nd.collect_activations(nd.LanguageModel(path), DOCS[:3], ["model.model.norm", "model.layers.*.mlp"],
                                 str(tmp_path / "s"), progress=False)
    assert got.modules == [f"model.layers.{i}.mlp" for i in range(12)] + ["model.norm"]


def test_resume_refuses_another_model_or_data(store, tiny, tmp_path_factory):
    other = nd.LanguageModel(nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("other")), arch="llama", seed=1))
    before = tree_digest(store.path)
    with pytest.raises(nd.StoreError, match="different model"):
        nd.collect_activations(other, DOCS, PATTERNS, store.path, batch_size=4, chunk_batches=2,
                               include_inputs=True, progress=False)
    with pytest.raises(nd.StoreError, match="different data"):
        nd.collect_activations(nd.LanguageModel(tiny), DOCS[:-1], PATTERNS, store.path, batch_size=4,
                               chunk_batches=2, include_inputs=True, progress=False)
    with pytest.raises(nd.StoreError, match="different options"):
        nd.collect_activations(nd.LanguageModel(tiny), DOCS, PATTERNS, store.path, batch_size=2,
                               chunk_batches=2, include_inputs=True, progress=False)
    assert tree_digest(store.path) == before  # nothing already saved is lost


def test_bad_data_is_a_clear_error(model, tmp_path):
    with pytest.raises(nd.StoreError, match="not a string"):
        nd.collect_activations(model, ["fine", 3], PATTERNS, str(tmp_path / "a"), progress=False)
    with pytest.raises(nd.StoreError, match="does not exist"):
        nd.collect_activations(model, str(tmp_path / "missing.txt"), PATTERNS, str(tmp_path / "b"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(nd.StoreError, match="'text' field"):
        nd.collect_activations(model, str(bad), PATTERNS, str(tmp_path / "c"), progress=False)


def test_split_for_replica_is_contiguous_and_complete():
    items = list(range(10))
    assert nd.split_for_replica(items) == items  # one process: everything
    blocks = [list(replica_range(10, r, 3)) for r in range(3)]
    assert sum(blocks, []) == items and [len(b) for b in blocks] == [3, 3, 4]


def test_a_datasets_column_gives_the_same_store(model, store, tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    for source in (table, table["text"]):
        out = tmp_path / type(source).__name__
        nd.collect_activations(model, source, PATTERNS, str(out), batch_size=4, chunk_batches=2,
                               include_inputs=True, progress=False)
        assert tree_digest(str(out)) == tree_digest(store.path)


def test_max_length_and_dtype(model, store, tmp_path):
    short = nd.collect_activations(model, DOCS, PATTERNS, str(tmp_path / "s"), batch_size=4, chunk_batches=2,
                                   include_inputs=True, progress=False, max_length=5, dtype=torch.bfloat16)
    lengths = [min(len(model.tokenizer(d)["input_ids"]), 5) for d in DOCS]
    assert short.num_tokens == sum(lengths)
    assert int(short.tokens()["position"].max()) == 4
    assert short["model.layers.1.mlp"].dtype == torch.bfloat16
    keep = store.tokens()["position"] < 5  # the first 5 tokens see the same context when cut
    torch.testing.assert_close(short["model.layers.1.mlp"][:], store["model.layers.1.mlp"][keep].to(torch.bfloat16))


def test_integer_entries_and_empty_documents(model, tmp_path):
    """The embedding's input (token ids) is an entry like any other; documents that tokenize
    to nothing give no rows and leave the chunk's dtype alone."""
    docs = ["a b", "", "c d", "", "", "the tower"]
    got = nd.collect_activations(model, docs, ["model.embed_tokens", "model.layers.0"], str(tmp_path / "s"),
                                 batch_size=1, chunk_batches=2, include_inputs=True, dtype=torch.bfloat16,
                                 progress=False)
    ids = got.tokens()["token_id"]
    assert torch.equal(got["model.embed_tokens.input"][:], ids)
    assert got["model.layers.0"].dtype == torch.bfloat16 and got["model.layers.0"][:].shape[0] == len(ids)
    assert got.stats("model.embed_tokens.input")["count"] == len(ids)
    assert sorted(set(got.tokens()["document"].tolist())) == [0, 2, 5]


def test_resume_refuses_the_model_in_another_dtype(tiny, tmp_path):
    out = str(tmp_path / "s")
    nd.collect_activations(nd.LanguageModel(tiny), DOCS, PATTERNS, out, batch_size=4, progress=False)
    with pytest.raises(nd.StoreError, match="different model"):
        nd.collect_activations(nd.LanguageModel(tiny, dtype=torch.bfloat16), DOCS, PATTERNS, out, batch_size=4,
                               progress=False)


def test_a_byte_order_mark_is_not_text(model, store, tmp_path):
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + ("\n".join(DOCS) + "\n").encode())
    assert Documents(str(txt)).fingerprint == Documents(DOCS).fingerprint
    assert Documents(str(txt)).read(range(0, 1)) == DOCS[:1]
