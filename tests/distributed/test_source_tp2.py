""".source operations under tensor and pipeline parallelism: an operation whose value is
exactly a child module's call (the call, or an assignment of its whole value) is served whole
and equals a single-process run; an operation on a fragment whose placement the engine does
not describe (a call or an assignment) is refused on every rank; operations of a later
pipeline stage (assignments too) are served and edited on every stage."""

from __future__ import annotations

import pytest
import torch
import transformers

import nnsight_dist as nd
from nnsight_dist.intervention.errors import NNsightError
from nnsight_dist.intervention.inject import inject
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "Hello world"


def _child_values(model) -> dict[str, torch.Tensor]:
    """Operations whose value is a child call's: `self.o_proj(...)` and `attn_output = ` it,
    `down_proj = self.down_proj(...)`, each read and (for the assignment) edited."""
    attn = model.model.layers[0].self_attn.source
    mlp = model.model.layers[0].mlp.source
    v: dict[str, torch.Tensor] = {}
    with model.trace(PROMPT):
        v["o_proj_in"] = attn.self_o_proj_0.input.save()
        v["o_proj_out"] = attn.self_o_proj_0.output.save()
        v["bound_in"] = attn.attn_output_1.input.save()
        v["bound_out"] = attn.attn_output_1.output.save()
        v["down_proj_bound"] = mlp.down_proj_0.output.save()
        v["logits"] = model.lm_head.output.save()
    with model.trace(PROMPT):
        attn.attn_output_1.output[:, -1] = 0
        v["edited_logits"] = model.lm_head.output.save()
    return {k: t.clone() for k, t in v.items()}


def _tp2_child_values(rank: int, path: str) -> dict[str, torch.Tensor]:
    return _child_values(nd.LanguageModel(path, tp=2))


def test_child_call_operations_equal_one_process_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    expected = _child_values(nd.LanguageModel(path))
    assert not torch.equal(expected["edited_logits"], expected["logits"])
    for values in run_ranks(_tp2_child_values, 2, path, timeout=180):
        assert values.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(values[key], value, msg=key)


def _mlp_forward(self, x):
    up = self.up_proj(x)
    return self.down_proj(self.act_fn(self.gate_proj(x)) * up)


def _colwise_bound_values(model) -> dict[str, torch.Tensor]:
    """`up = self.up_proj(x)`: an assignment of a colwise (sharded) child output."""
    mlp = model.model.layers[0].mlp.source
    v: dict[str, torch.Tensor] = {}
    with model.trace(PROMPT):
        # copies: the in-place edit below would change the one-process values they alias
        v["call"] = mlp.self_up_proj_0.output.clone().save()
        v["bound_in"] = mlp.up_0.input.clone().save()
        v["bound_out"] = mlp.up_0.output.clone().save()
        mlp.up_0.output[:, -1] = 0
        v["edited_logits"] = model.lm_head.output.save()
    return {k: t.clone() for k, t in v.items()}


def _tp2_colwise_bound_values(rank: int, path: str) -> dict[str, torch.Tensor]:
    transformers.models.llama.modeling_llama.LlamaMLP.forward = _mlp_forward  # this rank's process only
    return _colwise_bound_values(nd.LanguageModel(path, tp=2))


def test_assignment_of_a_sharded_child_output_tp2(tmp_path, monkeypatch):
    path = nd.testing.make_tiny_model(str(tmp_path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        plain = reference(**transformers.AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")).logits
    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaMLP, "forward", _mlp_forward)
    expected = _colwise_bound_values(nd.LanguageModel(path))
    assert not torch.equal(expected["edited_logits"], plain)
    for values in run_ranks(_tp2_colwise_bound_values, 2, path, timeout=180):
        for key, value in expected.items():
            torch.testing.assert_close(values[key], value, msg=key)


def _stage1_values(model) -> dict[str, torch.Tensor]:
    """Assignment and call operations of a layer on the last pipeline stage, read and edited."""
    layer = model.model.layers[3]
    outer, inner = layer.source, layer.self_attn.source  # both rewritten before the run reaches them
    v: dict[str, torch.Tensor] = {}
    with model.trace(PROMPT):
        v["bound"] = inner.attn_output_1.output.clone().save()
        v["residual"] = outer.hidden_states_1.output.clone().save()  # `residual + hidden_states`
        outer.hidden_states_1.output = outer.hidden_states_1.output * 0.5
        v["edited_logits"] = model.lm_head.output.save()
    return v


def _pp2_stage1_values(rank: int, path: str) -> dict[str, torch.Tensor]:
    return _stage1_values(nd.LanguageModel(path, pp=2))


def test_stage1_operations_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    expected = _stage1_values(nd.LanguageModel(path))
    for values in run_ranks(_pp2_stage1_values, 2, path, timeout=180):
        for key, value in expected.items():
            torch.testing.assert_close(values[key], value, msg=key)


def _attention_operations(path: str) -> list[str]:
    """The installed attention forward's operations, from the forward itself."""
    with torch.device("meta"):  # the classes only: no weights, no compute before the ranks fork
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    return list(inject(type(model.model.layers[0].self_attn).forward, "attention").lines)


def _refusals(rank: int, path: str, ops: list[str]) -> list[tuple[str, str]]:
    model = nd.LanguageModel(path, tp=2)
    out = []
    for op in ops:
        try:
            with model.trace(PROMPT):
                getattr(model.model.layers[0].self_attn.source, op).output.save()
            out.append((op, "served"))
        except NNsightError as error:
            out.append((op, str(error)))
    return out


def test_fragment_operations_refused_tp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    names = _attention_operations(path)
    # The call on q_proj's colwise output (`self.q_proj(h).view(...)`: the next operation)
    # and the assignment of what that line computes (`query_states = ...`).
    ops = [names[names.index("self_q_proj_0") + 1], "query_states_0"]
    assert ops[0] != ops[1] and ops[1] in names
    for result in run_ranks(_refusals, 2, path, ops, timeout=180):
        assert [op for op, _ in result] == ops
        for op, message in result:
            assert "tensor-parallel fragment" in message, (op, message)


def _whole_boundary_refusals(rank: int, path: str, engine: str) -> dict[str, list[str]]:
    """Every operation of the modules whose input and output are whole but whose weights
    are shards (the head gathers its columns, the embedding reduces its rows): read each."""
    model = nd.LanguageModel(path, tp=2, engine=engine)
    out: dict[str, list[str]] = {}
    for envoy in (model.lm_head, model.model.embed_tokens):
        source = envoy.source
        for op in source.line_numbers:
            try:
                with model.trace(PROMPT):
                    getattr(source, op).output.save()
                message = "served"
            except NNsightError as error:
                message = str(error)
            out.setdefault(envoy.path, []).append(message)
    return out


@pytest.mark.parametrize("engine", ["transformers", "torch"])
def test_operations_inside_sharded_whole_modules_refused_tp2(tmp_path, engine):
    """Inside a module that holds weight shards, what precedes its gather or reduction is
    this rank's part: no operation of it is shown (it is never served as the whole value)."""
    path = nd.testing.make_tiny_model(str(tmp_path))
    for result in run_ranks(_whole_boundary_refusals, 2, path, engine, timeout=180):
        assert set(result) == {"model.lm_head", "model.model.embed_tokens"}
        for module, messages in result.items():
            assert messages, module
            for message in messages:
                assert "tensor-parallel fragment" in message, (module, message)


@pytest.mark.parametrize("forward,expected", [
    ("def forward(self, x):\n    y = self.fc(x)\n    return y\n", {"self_fc_0": ("fc", True), "y_0": ("fc", False)}),
    # a value that is not exactly the call, a rebound receiver, a reassigned attribute: none
    ("def forward(self, x):\n    y = self.fc(x) + 1\n    return self.fc[0](y)\n", {"self_fc_0": ("fc", True)}),
    ("def forward(self, x):\n    self = x\n    y = self.fc(x)\n    return y\n", {}),
    ("def forward(self, x):\n    self.fc = x\n    y = self.fc(x)\n    return self.g(y)\n",
     {"self_g_0": ("g", True)}),
    ("def forward(self, x):\n    f = lambda self: self.fc(x)\n    return f(self)\n", {}),
    ("def forward(self, x):\n    try:\n        pass\n    except E as self:\n        pass\n    return self.fc(x)\n", {}),
    ("def forward(self, x):\n    setattr(self, 'fc', x)\n    return self.fc(x)\n", {}),
])
def test_exact_child_calls_are_derived_soundly(tmp_path, forward, expected):
    """What the replica places by a child's placement: only values that are exactly the call."""
    file = tmp_path / "fwd.py"
    file.write_text(forward)
    namespace: dict = {}
    exec(compile(forward, str(file), "exec"), namespace)
    assert inject(namespace["forward"], "m").attribute_calls == expected
