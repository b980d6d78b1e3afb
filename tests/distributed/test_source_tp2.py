""".source operations under tensor parallelism: a child call is served whole; an operation on
a fragment whose placement the engine does not describe is refused on every rank."""

from __future__ import annotations

import torch
import transformers

import nnsight_dist as nd
from nnsight_dist.intervention.inject import inject
from nnsight_dist.testing.ranks import run_ranks


def _read_operation(rank: int, path: str, op: str) -> None:
    model = nd.LanguageModel(path, tp=2)
    with model.trace("Hello world"):
        q = getattr(model.model.layers[0].self_attn.source, op).output.save()


def _call_on_q_proj_output(path: str) -> str:
    """The installed attention forward's operation on q_proj's output (a colwise fragment
    under tp=2), e.g. ``view_0`` in ``self.q_proj(h).view(shape)``: in the post-order naming
    it is the next operation, on the same line."""
    with torch.device("meta"):  # the classes only: no weights, no compute before the ranks fork
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    attention = type(model.model.layers[0].self_attn)
    _, lines, _ = inject(attention.forward, "attention")
    names = list(lines)
    op = names[names.index("self_q_proj_0") + 1]
    assert lines[op] == lines["self_q_proj_0"], (op, lines)
    return op


def test_fragment_operation_refused_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    op = _call_on_q_proj_output(path)
    results = run_ranks(_read_operation, 2, path, op, timeout=60, expect_errors=True)
    for r in results:
        assert r[0] == "error" and r[1] == "NNsightError" and "tensor-parallel fragment" in r[2]
