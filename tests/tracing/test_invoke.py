"""``tracer.invoke``: several inputs batched into one forward, each invoke on its own rows.

The reference is the plain model run on the batch the invokes make together: the prompts
left-padded with eos by the tokenizer itself, in invoke order.
"""

from __future__ import annotations

import torch

from conftest import LONG, SAME_LEN, SHORT, close, equal, recorder


def _ref_rows(tiny, prompts, module_of):
    """The reference's output of ``module_of(ref)`` and its logits on the padded batch."""
    store = []
    logits = tiny.logits(prompts, (module_of(tiny.ref), "forward", recorder(store)))
    return store[0], logits


def test_invokes_see_own_rows(tiny):
    L = tiny.layers()
    with tiny.model.trace() as tracer:
        with tracer.invoke([LONG, SHORT]):
            h1 = L[1].output.save()
            o1 = tiny.model.lm_head.output.save()
        with tracer.invoke(SAME_LEN[0]):
            h2 = L[1].output.save()
            o2 = tiny.model.lm_head.output.save()
    ref_h, ref_o = _ref_rows(tiny, [LONG, SHORT, SAME_LEN[0]], lambda m: tiny.layers(m)[1])
    assert h1.shape[0] == 2 and h2.shape[0] == 1
    equal(h1, ref_h[0:2])
    equal(h2, ref_h[2:3])
    equal(o1, ref_o[0:2])
    equal(o2, ref_o[2:3])


def test_invoke_rows_match_single_prompt_forward(tiny):
    a, b = SAME_LEN
    assert len(tiny.tok(a)["input_ids"]) == len(tiny.tok(b)["input_ids"])  # no padding
    L = tiny.layers()
    with tiny.model.trace() as tracer:
        with tracer.invoke(a):
            mlp_a = tiny.mlp_out(L[2]).output.save()
            out_a = tiny.model.lm_head.output.save()
        with tracer.invoke(b):
            mlp_b = tiny.mlp_out(L[2]).output.save()
            out_b = tiny.model.lm_head.output.save()
    for prompt, mlp, out in ((a, mlp_a, out_a), (b, mlp_b, out_b)):
        ref_mlp, ref_out = _ref_rows(tiny, prompt, lambda m: tiny.mlp_out(tiny.layers(m)[2]))
        close(mlp, ref_mlp)
        close(out, ref_out)


def test_inplace_edit_in_one_invoke(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace() as tracer:
        with tracer.invoke(SHORT):
            o1 = tiny.model.lm_head.output.save()
        with tracer.invoke(LONG):
            L[1].output[:, -3:] = 0
            o2 = tiny.model.lm_head.output.save()
        with tracer.invoke(SAME_LEN[0]):
            o3 = tiny.model.lm_head.output.save()

    def edit_row_1(m, a, o):
        o[1:2, -3:] = 0

    prompts = [SHORT, LONG, SAME_LEN[0]]
    expected = tiny.logits(prompts, (R[1], "forward", edit_row_1))
    plain = tiny.logits(prompts)
    equal(o1, plain[0:1])
    equal(o3, plain[2:3])
    equal(o2, expected[1:2])
    assert not torch.equal(o2, plain[1:2])


def test_replacement_in_one_invoke(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    mlp = tiny.mlp_out(L[1])
    with tiny.model.trace() as tracer:
        with tracer.invoke(LONG):
            mlp.output = mlp.output * 4
            o1 = tiny.model.lm_head.output.save()
        with tracer.invoke(SHORT):
            seen = mlp.output.save()
            o2 = tiny.model.lm_head.output.save()

    def scale_row_0(m, a, o):
        return torch.cat([o[0:1] * 4, o[1:]])

    prompts = [LONG, SHORT]
    ref_mlp = []
    expected = tiny.logits(prompts, (tiny.mlp_out(R[1]), "forward", scale_row_0),
                           (tiny.mlp_out(R[1]), "forward", recorder(ref_mlp)))
    plain = tiny.logits(prompts)
    equal(o1, expected[0:1])
    equal(o2, plain[1:2])
    equal(seen, ref_mlp[0][1:2])
    assert not torch.equal(o1, plain[0:1])


def test_empty_invoke_sees_whole_batch(tiny):
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace() as tracer:
        with tracer.invoke(LONG):
            first = L[1].output.save()
        with tracer.invoke(SHORT):
            second = L[1].output.save()
        with tracer.invoke():
            whole = L[1].output.save()
            L[2].output[:, -1] = 0
            logits = tiny.model.lm_head.output.save()

    def zero_last(m, a, o):
        o[:, -1] = 0

    prompts = [LONG, SHORT]
    ref_h, _ = _ref_rows(tiny, prompts, lambda m: tiny.layers(m)[1])
    assert whole.shape[0] == 2
    equal(whole, ref_h)
    equal(first, ref_h[0:1])
    equal(second, ref_h[1:2])
    equal(logits, tiny.logits(prompts, (R[2], "forward", zero_last)))


def test_barrier_patch_between_invokes(tiny):
    a, b = SAME_LEN
    L, R = tiny.layers(), tiny.layers(tiny.ref)
    with tiny.model.trace() as tracer:
        bar = tracer.barrier(2)
        with tracer.invoke(a):
            clean = L[1].output[:, -1]
            bar()
            out_a = tiny.model.lm_head.output.save()
        with tracer.invoke(b):
            bar()
            L[1].output[:, -1] = clean
            out_b = tiny.model.lm_head.output.save()

    # Reference in two passes: record the clean value on a, then patch it into b.
    recorded = []
    tiny.logits(a, (R[1], "forward", recorder(recorded)))

    def patch(m, args, o):
        o[:, -1] = recorded[0][:, -1]

    expected_b = tiny.logits(b, (R[1], "forward", patch))
    close(out_a, tiny.logits(a))
    close(out_b, expected_b)
    assert not torch.allclose(out_b, tiny.logits(b))


def test_invoke_with_pass_body_joins_the_batch(llama):
    with llama.model.trace() as tracer:
        with tracer.invoke(LONG):
            pass
        with tracer.invoke(SHORT):
            logits = llama.model.lm_head.output.save()
    equal(logits, llama.logits([LONG, SHORT])[1:2])


def test_padded_invoke_matches_unbatched_forward(tiny, request):
    """A short prompt batched (left-padded) with a long one gives the values it has alone.

    The reference is the prompt run alone: no padding, positions 0..n-1.
    """
    with tiny.model.trace() as tracer:
        with tracer.invoke(LONG):
            pass_ = 1  # noqa: F841
        with tracer.invoke(SHORT):
            logits = tiny.model.lm_head.output.save()
    alone = tiny.logits(SHORT)
    n = alone.shape[1]
    close(logits[:, -n:], alone)


def test_result_and_model_output_per_invoke(tiny):
    with tiny.model.trace() as tracer:
        with tracer.invoke(LONG):
            out_a = tiny.model.output.save()
            res_a = tracer.result.save()
        with tracer.invoke(SHORT):
            res_b = tracer.result.save()
    expected = tiny.logits([LONG, SHORT])
    equal(out_a.logits, expected[0:1])
    equal(res_a.logits, expected[0:1])
    equal(res_b.logits, expected[1:2])


def test_generate_result_per_invoke(llama):
    with llama.model.generate(max_new_tokens=3, do_sample=False) as tracer:
        with tracer.invoke(LONG):
            a = tracer.result.save()
        with tracer.invoke(SHORT):
            b = tracer.result.save()
    expected = llama.ref_generate([LONG, SHORT], max_new_tokens=3, do_sample=False)
    equal(a, expected[0:1])
    equal(b, expected[1:2])
