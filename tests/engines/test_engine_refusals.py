"""What no engine may show as whole, at tp=2 on every engine (forked gloo ranks, against one
process of the same weights): the model outputs' attention weights (this rank's heads), a
module's own listing of sliced weights, a whole value that does not split into the layer's
equal slices (one process fails on it too); and what each engine must still serve: ad-hoc
calls with the input as a keyword, the logits beside refused attention weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnsight_dist as nd
from nnsight_dist import engines
from nnsight_dist.engines.styles import attention_outputs
from nnsight_dist.intervention.errors import NNsightError
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "Hello world"


def _outcome(fn) -> tuple:
    try:
        value = fn()
    except (NNsightError, RuntimeError) as error:
        return type(error).__name__, str(error)
    return "ok", value


def _probe(model) -> dict:
    mlp = model.model.layers[0].mlp
    width = model.config.intermediate_size

    def attentions():
        with model.trace(PROMPT, output_attentions=True):
            logits = model.output.logits.save()
            first = model.output.attentions[0].save()
        return logits, first

    def logits_only():
        with model.trace(PROMPT, output_attentions=True):
            logits = model.output.logits.save()
        return logits

    def keyword_call():
        with model.trace(PROMPT):
            out = mlp.down_proj(input=torch.ones(1, 2, width)).save()
        return out

    def wrong_width():
        with model.trace(PROMPT):
            out = mlp.down_proj(torch.ones(1, 2, width + 1)).save()
        return out

    def listing():
        return sum(p.numel() for p in model.parameters())

    return {name: _outcome(fn) for name, fn in (("attentions", attentions), ("logits", logits_only),
                                                   ("keyword_call", keyword_call), ("wrong_width", wrong_width),
                                                   ("listing", listing))}


def _ranks(rank: int, path: str, engine: str) -> dict:
    return _probe(nd.LanguageModel(path, tp=2, engine=engine, attn_implementation="eager"))


@pytest.mark.parametrize("engine", list(engines.MODULES))
def test_refused_or_as_one_process_tp2(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    path = nd.testing.make_tiny_model(str(tmp_path))
    want = _probe(nd.LanguageModel(path, attn_implementation="eager"))
    assert want["attentions"][0] == want["keyword_call"][0] == "ok"
    assert want["wrong_width"][0] == "RuntimeError"  # a shape mismatch in one process
    for rank, got in enumerate(run_ranks(_ranks, 2, path, engine, timeout=300, env={"NNSIGHT_DIST_TIMEOUT": "60"})):
        where = f"{engine} rank {rank}"
        assert got["attentions"][0] == "NNsightError" and "tensor-parallel fragment" in got["attentions"][1], where
        torch.testing.assert_close(got["logits"][1], want["logits"][1], msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(got["keyword_call"][1], want["keyword_call"][1], msg=lambda m: f"{where}: {m}")
        assert got["wrong_width"][0] == "RuntimeError" and "equal tensor-parallel slices" in got["wrong_width"][1], where
        if engine == "deepspeed":  # plain sliced tensors: the listing would show slices
            assert got["listing"][0] == "NNsightError" and "slices" in got["listing"][1], where
        else:  # DTensors: whole shapes
            assert got["listing"] == want["listing"], where


def test_a_parent_of_parallel_layers_shows_only_its_first_element():
    """An attention whose row-parallel layer is not called ``o_proj`` (Phi's ``dense``): its
    output's first element is reduced, whole; the others (its heads' weights) are refused."""
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "dense"):
        setattr(attention, name, nn.Linear(4, 4))
    root = nn.Module()
    root.self_attn = attention
    styles = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.dense": "rowwise"}
    assert attention_outputs(root, styles) == {"self_attn": "(whole)"}
