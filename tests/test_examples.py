"""The patching examples (examples/*.py) in one process, each table against its own
computation with plain ``transformers`` on the same weights:

- activation patching: every cell re-run with a forward hook that writes the clean layer
  output into the corrupted run at that position;
- logit lens: the final norm and ``lm_head`` applied to hooked layer outputs;
- attribution patching: ``torch.autograd.grad`` of the metric with respect to hooked layer
  outputs of the corrupted run.

The multi-rank runs of the same examples are in tests/distributed/test_examples_ranks.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import transformers

import nnsight_dist as nd
from helpers import example, read_csv


def column(rows: list[dict[str, str]], name: str) -> torch.Tensor:
    return torch.tensor([float(r[name]) for r in rows])


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


class Reference:
    """The example's defaults computed with plain ``transformers``: forward hooks on the decoder layers."""

    def __init__(self, path: str) -> None:
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        shared = example("experiment")
        self.clean, self.corrupt = shared.CLEAN, shared.CORRUPT
        self.answers = [self.tokenizer(a, add_special_tokens=False).input_ids[0] for a in shared.ANSWERS]

    def ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def run(self, prompt: str, patch: tuple[int, int, torch.Tensor] | None = None):
        """``(logits, [layer outputs])``; ``patch = (layer, position, value)`` writes
        ``value[:, position]`` into that layer's output."""
        outs: list[torch.Tensor] = []

        def hook(module, args, out):
            assert isinstance(out, torch.Tensor)  # a Llama decoder layer returns its hidden states
            if patch is not None and len(outs) == patch[0]:
                out = out.clone()
                out[:, patch[1]] = patch[2][:, patch[1]]
            outs.append(out)
            return out

        handles = [layer.register_forward_hook(hook) for layer in self.model.model.layers]
        try:
            logits = self.model(self.ids(prompt)).logits
        finally:
            for h in handles:
                h.remove()
        return logits, outs

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, self.answers[0]] - logits[0, -1, self.answers[1]]

    def activation_patching(self) -> torch.Tensor:
        with torch.no_grad():
            clean_logits, clean = self.run(self.clean)
            corrupt = self.metric(self.run(self.corrupt)[0])
            positions = self.ids(self.clean).shape[1]
            table = torch.tensor([[float(self.metric(self.run(self.corrupt, (layer, pos, clean[layer]))[0]))
                                   for pos in range(positions)] for layer in range(len(clean))])
        return (table - corrupt) / (self.metric(clean_logits) - corrupt)

    def attribution_patching(self) -> torch.Tensor:
        with torch.no_grad():
            clean_logits, clean = self.run(self.clean)
        logits, hidden = self.run(self.corrupt)
        metric = self.metric(logits)
        grads = torch.autograd.grad(metric, hidden)
        self.model.zero_grad(set_to_none=True)
        effect = torch.stack([(g * (c - h)).sum(-1)[0] for g, c, h in zip(grads, clean, hidden)]).detach()
        return effect / (self.metric(clean_logits) - metric).detach()

    def logit_lens(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            _, hidden = self.run(self.clean)
            probs = torch.stack([self.model.lm_head(self.model.model.norm(h)).softmax(-1)[0] for h in hidden])
        top = probs.max(-1)
        return top.indices, top.values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return nd.testing.make_tiny_model(str(tmp_path_factory.mktemp("examples") / "llama"))


@pytest.fixture(scope="module")
def reference(tiny) -> Reference:
    return Reference(tiny)


@pytest.fixture(scope="module")
def outputs(tiny, tmp_path_factory) -> str:
    """Every example run once in this process, writing into one directory."""
    out = str(tmp_path_factory.mktemp("out"))
    for name in ("activation_patching", "logit_lens", "attribution_patching"):
        example(name).main(["--model-dir", tiny, "--out", out])
    return out


def check_grid(rows: list[dict[str, str]], reference: Reference, layers: int) -> None:
    """Rows are (layer, position) in order, labelled with the clean prompt's tokens."""
    ids = reference.ids(reference.clean)[0]
    assert [(int(r["layer"]), int(r["position"])) for r in rows] == [
        (layer, pos) for layer in range(layers) for pos in range(len(ids))]
    assert [r["token"] for r in rows] == [reference.tokenizer.decode(i) for i in ids] * layers


def test_activation_patching(outputs, reference):
    rows = read_csv(os.path.join(outputs, "activation_patching.csv"))
    expected = reference.activation_patching()
    check_grid(rows, reference, expected.shape[0])
    torch.testing.assert_close(column(rows, "value"), expected.flatten(), rtol=1e-4, atol=1e-5)
    # Sanity of the reference itself: the first positions hold the same tokens in both
    # prompts (patching them changes nothing), the last layer's last position is the clean run.
    assert expected[:, 0].abs().max() < 1e-6
    torch.testing.assert_close(expected[-1, -1], torch.tensor(1.0))


def test_attribution_patching(outputs, reference):
    rows = read_csv(os.path.join(outputs, "attribution_patching.csv"))
    expected = reference.attribution_patching()
    check_grid(rows, reference, expected.shape[0])
    torch.testing.assert_close(column(rows, "value"), expected.flatten(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(column(rows, "activation_patching"), reference.activation_patching().flatten(),
                               rtol=1e-4, atol=1e-5)


def test_logit_lens(outputs, reference):
    rows = read_csv(os.path.join(outputs, "logit_lens.csv"))
    tokens, probs = reference.logit_lens()
    check_grid(rows, reference, tokens.shape[0])
    assert [int(r["top_id"]) for r in rows] == tokens.flatten().tolist()
    assert [r["top_token"] for r in rows] == [reference.tokenizer.decode(i) for i in tokens.flatten()]
    torch.testing.assert_close(column(rows, "probability"), probs.flatten(), rtol=1e-4, atol=1e-6)


def test_figures(outputs):
    pytest.importorskip("matplotlib")
    for name in ("activation_patching", "logit_lens", "attribution_patching"):
        assert is_png(os.path.join(outputs, f"{name}.png")), name


def test_without_matplotlib_and_without_a_checkpoint(outputs, tmp_path, monkeypatch, capsys):
    """No matplotlib: a note, the table, no figure. An empty ``--model-dir``: the tiny model is built there."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    model_dir, out = tmp_path / "model", tmp_path / "out"
    example("logit_lens").main(["--model-dir", str(model_dir), "--out", str(out)])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["logit_lens.csv"]
    assert os.path.exists(model_dir / "config.json")
    assert read_csv(out / "logit_lens.csv") == read_csv(os.path.join(outputs, "logit_lens.csv"))
