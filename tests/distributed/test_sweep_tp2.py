"""Every location at tp=2: each module's inputs (args, kwargs) and output, every element of
tuples and model outputs, read in check mode and compared with one process on the same
weights. Where the library refuses a part by design (a fragment it cannot assemble: the
key/value cache), the refusal is asserted, and the single-process value there is that object.
The transformers engine on each case, the torch engine (``parallelize_module``) on llama.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.distributed.placement import Refused
from nnsight_dist.testing.ranks import run_ranks

PROMPT = "The Eiffel Tower is in the city of"
CASES = {  # name: (arch, attention implementation (eager returns the attention weights), engine)
    "llama_eager": ("llama", "eager", "transformers"),
    "qwen2_eager": ("qwen2", "eager", "transformers"),
    "llama_config": ("llama", None, "transformers"),
    "llama_eager_torch_engine": ("llama", "eager", "torch"),
}


def _load(path: str, attn: Any, **kwargs: Any) -> nd.LanguageModel:
    return nd.LanguageModel(path, **({"attn_implementation": attn} if attn else {}), **kwargs)


def visit_order(model: nd.LanguageModel) -> list[tuple[str, str]]:
    """``(path, "input"|"output")`` in the order a forward reaches them, from plain torch hooks."""
    order: list[tuple[str, str]] = []
    handles = []
    for path, envoy in model.named_modules():
        module = envoy._module
        handles.append(module.register_forward_pre_hook(lambda *_, p=path: order.append((p, "input"))))
        handles.append(module.register_forward_hook(lambda *_, p=path: order.append((p, "output"))))
    try:
        with torch.no_grad():
            model._module(**model.tokenizer(PROMPT, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return order


def flatten(value: Any, prefix: str, out: dict) -> None:
    """Leaves of ``value`` under printable paths: tensors, plain scalars, ``object:<type>``, or
    ``refused:<error>`` where a stand-in refused to be used."""
    if isinstance(value, Refused):
        try:
            value.shape
        except nd.NNsightError as e:
            out[prefix] = f"refused:{type(e).__name__}:{e}"
        return
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}[{k!r}]", out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    else:
        out[prefix] = f"object:{type(value).__name__}"


def read_all(model: nd.LanguageModel, order: list[tuple[str, str]]) -> dict:
    """Every location of ``order``, then ``tracer.result``, read in one trace, flattened."""
    root = model.path
    with model.trace(PROMPT) as tracer:
        values = nd.save([])
        for path, key in order:
            envoy = model.get(path[len(root) + 1:])
            values.append(envoy.inputs if key == "input" else envoy.output)
        values.append(tracer.result)
    out: dict = {}
    for (path, key), value in zip(order, values):
        flatten(value, f"{path}.{'inputs' if key == 'input' else 'output'}", out)
    flatten(values[-1], "tracer.result", out)
    return out


def _rank(rank: int, path: str, attn: Any, engine: str, order: list) -> dict:
    return read_all(_load(path, attn, tp=2, engine=engine), [tuple(o) for o in order])


@pytest.mark.parametrize("case", list(CASES))
def test_sweep_tp2(tmp_path, case):
    arch, attn, engine = CASES[case]
    path = nd.testing.make_tiny_model(str(tmp_path), arch=arch)
    single = _load(path, attn)
    order = visit_order(single)
    reached = {p for p, _ in order}
    # Every module is reached, except containers that have no forward (the layer list).
    assert all(isinstance(e._module, torch.nn.ModuleList) for p, e in single.named_modules() if p not in reached)
    expected = read_all(single, order)
    results = run_ranks(_rank, 2, path, attn, engine, [list(o) for o in order], timeout=240,
                        env={"NNSIGHT_DIST_TIMEOUT": "60", "NNSIGHT_DIST_CHECK": "1"})
    heads = single.config.num_attention_heads
    weights = [k for k, v in expected.items() if k.endswith("self_attn.output[1]")]
    assert len(weights) == single.config.num_hidden_layers
    for k in weights:
        want = (1, heads, *expected[k].shape[-2:]) if attn == "eager" else None
        assert (tuple(expected[k].shape) if attn == "eager" else expected[k]) == want, k
    for rank, got in enumerate(results):
        assert set(got) == set(expected), f"rank {rank}: {sorted(set(got) ^ set(expected))}"
        refused = []
        for name, want in expected.items():
            have = got[name]
            if isinstance(have, str) and have.startswith("refused:"):
                # Refused by design: a key/value cache (each rank holds its heads), never shown.
                assert want == "object:DynamicCache", f"rank {rank}: {name} refused, but is {want!r} in one process"
                assert have.startswith("refused:NNsightError:") and name in have and "tensor-parallel fragment" in have
                refused.append(name)
            elif isinstance(want, torch.Tensor):
                assert isinstance(have, torch.Tensor) and have.shape == want.shape, f"rank {rank}: {name}"
                torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")
            else:
                assert have == want, f"rank {rank}: {name} is {have!r}, {want!r} in one process"
        assert set(refused) == {k for k, v in expected.items() if v == "object:DynamicCache"}
    for name, value in results[0].items():  # the ranks agree bit for bit
        other = results[1][name]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
