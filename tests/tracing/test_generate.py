"""``model.generate``: per-step access with ``tracer.iter`` / ``all`` / ``next``, results, edits.

The reference is ``generate`` on the separately loaded model, with a forward hook on
``lm_head`` recording its output at each call (one call per generation step).
"""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from conftest import LONG, SAME_LEN, SHORT, equal, recorder

PROMPT = SAME_LEN[0]
STEPS = 3
GEN = dict(max_new_tokens=STEPS, do_sample=False)


def _reference(tiny, prompts=PROMPT, *hooks):
    logits = []
    ids = tiny.ref_generate(prompts, (tiny.ref.lm_head, "forward", recorder(logits)), *hooks, **GEN)
    assert len(logits) == STEPS
    return ids, logits


def test_iter_every_step_and_result(tiny):
    with tiny.model.generate(PROMPT, **GEN) as tracer:
        steps = nd.save([])
        for step in tracer.iter[:3]:
            steps.append(tiny.model.lm_head.output)
        tokens = tracer.result.save()
    ids, logits = _reference(tiny)
    equal(tokens, ids)
    assert len(steps) == STEPS
    for got, ref in zip(steps, logits):
        equal(got, ref)


def test_iter_single_step(tiny):
    with tiny.model.generate(PROMPT, **GEN) as tracer:
        seen = nd.save([])
        for step in tracer.iter[1]:
            seen.append((step, tiny.model.lm_head.output))
    _, logits = _reference(tiny)
    assert [s for s, _ in seen] == [1]
    equal(seen[0][1], logits[1])


def test_iter_slice(llama):
    with llama.model.generate(PROMPT, **GEN) as tracer:
        seen = nd.save([])
        for step in tracer.iter[0:2]:
            seen.append((step, llama.model.lm_head.output))
    _, logits = _reference(llama)
    assert [s for s, _ in seen] == [0, 1]
    for step, value in seen:
        equal(value, logits[step])


def test_all(llama):
    with pytest.warns(UserWarning, match="iteration 3 was never reached"):  # as nnsight 0.8.1
        with llama.model.generate(PROMPT, **GEN) as tracer:
            seen = nd.save([])
            for step in tracer.all():
                seen.append((step, llama.model.lm_head.output))
    _, logits = _reference(llama)
    assert [s for s, _ in seen] == list(range(STEPS))
    for step, value in seen:
        equal(value, logits[step])


def test_next(llama):
    with llama.model.generate(PROMPT, **GEN) as tracer:
        first = llama.model.lm_head.output.save()
        tracer.next()
        second = llama.model.lm_head.output.save()
        tracer.next()
        third = llama.model.lm_head.output.save()
    _, logits = _reference(llama)
    for got, ref in zip((first, second, third), logits):
        equal(got, ref)


def test_edit_in_one_step(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.generate(PROMPT, **GEN) as tracer:
        steps = nd.save([])
        for step in tracer.iter[:3]:
            if step == 1:
                L[1].output[:] = 0
            steps.append(tiny.model.lm_head.output)
        tokens = tracer.result.save()

    calls = []

    def zero_on_second_call(m, a, o):
        calls.append(1)
        if len(calls) == 2:
            o[:] = 0

    ids, logits = _reference(tiny, PROMPT, (R[1], "forward", zero_on_second_call))
    _, plain = _reference(tiny)
    equal(tokens, ids)
    for got, ref in zip(steps, logits):
        equal(got, ref)
    equal(steps[0], plain[0])
    assert not torch.equal(steps[1], plain[1])


def test_generate_two_invokes(tiny):
    with tiny.model.generate(**GEN) as tracer:
        with tracer.invoke(LONG):
            long_steps = nd.save([])
            for step in tracer.iter[:3]:
                long_steps.append(tiny.model.lm_head.output)
        with tracer.invoke(SHORT):
            short_steps = nd.save([])
            for step in tracer.iter[:3]:
                short_steps.append(tiny.model.lm_head.output)
        tokens = tracer.result.save()
    ids, logits = _reference(tiny, [LONG, SHORT])
    equal(tokens, ids)
    for step in range(STEPS):
        equal(long_steps[step], logits[step][0:1])
        equal(short_steps[step], logits[step][1:2])


def _force_eos(tiny):
    """A forward hook making eos the argmax at the last position (generation then stops)."""
    eos = tiny.tok.eos_token_id

    def hook(m, a, o):
        o[:, -1, eos] = o.abs().max() * 10

    return hook


def test_all_is_cut_when_generation_stops_early(tiny):
    eos = tiny.tok.eos_token_id
    with pytest.warns(UserWarning, match="iteration 1 was never reached"):
        with tiny.model.generate(PROMPT, **GEN) as tracer:
            steps = nd.save([])
            for step in tracer.all():
                tiny.model.lm_head.output[:, -1, eos] = tiny.model.lm_head.output.abs().max() * 10
                steps.append(tiny.model.lm_head.output)
    logits = []
    ids = tiny.ref_generate(PROMPT, (tiny.ref.lm_head, "forward", _force_eos(tiny)),
                            (tiny.ref.lm_head, "forward", recorder(logits)), **GEN)
    assert ids.shape[1] == tiny.encode(PROMPT)["input_ids"].shape[1] + 1  # stopped after one step
    assert len(steps) == len(logits) == 1
    equal(steps[0], logits[0])


def test_open_ended_loop_without_model_access_ends(tiny):
    """tracer.all() with no max_new_tokens and a body that never waits on the model: the
    loop ends after its first step instead of spinning."""
    with tiny.model.generate(PROMPT, do_sample=False, max_length=12) as tracer:
        count = nd.save([])
        for step in tracer.all():
            count.append(step)
        tokens = tracer.result.save()
    assert count == [0]
    assert tokens.shape[-1] == 12


def _cut_loops(model) -> dict:
    """Step loops that outrun a 3-step generation: a ``for`` over ``all()`` and a ``with``
    block over ``iter[1:5]``, both reading the last layer (stage 1 under pp=2)."""
    import warnings

    last = model.model.layers[3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.generate(PROMPT, **GEN) as tracer:
            steps = nd.save([])
            for step in tracer.all():
                steps.append(last.output[:, -1].clone())
            after = nd.save([1])
        with model.generate(PROMPT, **GEN) as tracer:
            block = nd.save([])
            with tracer.iter[1:5]:
                block.append(last.output[:, -1].clone())
            block_after = nd.save([1])
    cuts = sum("was never reached" in str(w.message) for w in caught)
    return {"steps": torch.stack(steps), "block": torch.stack(block), "cuts": torch.tensor(cuts),
            "after": torch.tensor("after" in locals()), "block_after": torch.tensor("block_after" in locals())}


def _cut_loops_rank(rank: int, path: str) -> dict:
    return _cut_loops(nd.LanguageModel(path, pp=2))


def test_cut_step_loops_pp2(tiny_dirs):
    """A loop past the run's steps is cut the same way on two pipeline stages as in one
    process: same values, one warning, no divergence between the stages."""
    from nnsight_dist.testing.ranks import run_ranks

    path = tiny_dirs["llama"]
    single = _cut_loops(nd.LanguageModel(path))
    assert single["cuts"] == 1 and not single["after"] and single["block_after"]
    for got in run_ranks(_cut_loops_rank, 2, path, timeout=180, env={"NNSIGHT_DIST_TIMEOUT": "60"}):
        assert got.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(got[key], single[key], rtol=1e-4, atol=1e-6)
