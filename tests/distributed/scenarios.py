"""Named values for the conformance suite: the same intervention code, run in one process and
on sharded topologies, must give the same values (DESIGN.md §5, the hard cases)."""

from __future__ import annotations

import torch

import nnsight_dist as nd

PROMPTS = ["The Eiffel Tower is in the city of", "Hello world"]


def trace_values(model) -> dict[str, torch.Tensor]:
    """Every named value of the suite, computed with ``model`` (a tiny 4-layer llama/qwen2)."""
    layers = model.model.layers
    v: dict[str, torch.Tensor] = {}

    with model.trace(PROMPTS[0]) as tracer:
        q = layers[0].self_attn.q_proj.output.save()                 # colwise output
        act = layers[0].mlp.act_fn.output.save()                      # between col- and rowwise
        d_in = layers[0].mlp.down_proj.input.save()                   # rowwise input
        d_out = layers[0].mlp.down_proj.output.save()                 # rowwise output
        args, kwargs = layers[1].inputs
        l1_in = args[0].save()
        h3 = layers[3].output.clone().save()                          # a stage-1 read
        base = model.model.output.last_hidden_state.save()             # a routed model output
        logits = model.lm_head.output.save()
        out = model.output.logits.save()                              # model.output
        result = tracer.result.logits.save()                          # tracer.result
    v.update(between_output=act, base_model_output=base, colwise_output=q, rowwise_input=d_in, rowwise_output=d_out, inputs_args=l1_in,
             stage1_read=h3, logits=logits, model_output=out, tracer_result=result)

    with model.trace(PROMPTS[0]):
        layers[0].mlp.down_proj.output[:, -1] = 0                     # rowwise output, in place
        layers[2].mlp.output = layers[2].mlp.output * 0.5             # stage-1 write
        written = model.lm_head.output.save()
    v["stage1_write_logits"] = written

    with model.trace(PROMPTS[0]):
        attn = layers[3].self_attn.output[0]                          # stage-1 read, then
        layers[3].mlp.output[:] = attn                                # an edit of stage 1
        read_edit = model.lm_head.output.save()
    v["read_then_edit_logits"] = read_edit

    with model.trace() as tracer:                                     # stage 0 -> stage 1
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPTS[1]):
            h0 = layers[0].output[:, -1]
            barrier()
        with tracer.invoke(PROMPTS[1]):
            barrier()
            layers[2].output[:, -1] = h0
            patched = model.lm_head.output.save()
    v["barrier_patch_logits"] = patched

    with model.trace() as tracer:                                     # batched invokes + edit
        with tracer.invoke(PROMPTS[0]):
            layers[1].output[:] = 0
            a = model.lm_head.output.save()
        with tracer.invoke(PROMPTS[1]):
            b = model.lm_head.output.save()
    v.update(batched_edit_a=a, batched_b=b)

    with model.trace(PROMPTS[0]):                                     # the logit lens: ad-hoc calls
        lens = nd.save([])                                            # of the last stage after each
        for layer in layers:                                          # layer's read
            lens.append(model.lm_head(model.model.norm(layer.output)))
    v["logit_lens"] = torch.stack(lens)

    with model.trace(PROMPTS[0]) as tracer:                           # stop() on stage 0
        early = layers[0].output.save()
        tracer.stop()
    v["stop_stage0"] = early

    with model.trace(PROMPTS[0]):                                     # skip a stage-1 layer
        layers[2].skip(layers[2].input)
        skipped = model.lm_head.output.save()
    v["skip_stage1_logits"] = skipped

    with model.trace(PROMPTS[0]):                                     # skip a colwise module
        mlp = layers[1].mlp
        mlp.up_proj.skip(mlp.gate_proj.output * 0.5)
        up = mlp.up_proj.output.save()
        skipped_colwise = model.lm_head.output.save()
    v.update(skip_colwise_output=up, skip_colwise_logits=skipped_colwise)

    with model.trace(PROMPTS[0]):                                     # ad-hoc sharded call
        x = layers[0].mlp.input
        gate = layers[0].mlp.gate_proj(x).save()
        down = layers[0].mlp.down_proj(torch.ones(*x.shape[:-1], model.config.intermediate_size)).save()
    v.update(adhoc_colwise=gate, adhoc_rowwise=down)

    with model.trace(PROMPTS[0]) as tracer:                           # a cache over both stages
        cache = tracer.cache(modules=[layers[0].mlp, layers[0].self_attn.q_proj, layers[3].mlp,
                                      layers[3].mlp.act_fn, model.lm_head], include_inputs=True)
    v["cache_stage0"] = cache["model.model.layers.0.mlp"].output
    v["cache_stage1"] = cache["model.model.layers.3.mlp"].output
    v["cache_stage1_input"] = cache["model.model.layers.3.mlp"].input
    v["cache_lm_head"] = cache.model.lm_head.output
    v["cache_colwise"] = cache["model.model.layers.0.self_attn.q_proj"].output          # fragments,
    v["cache_stage1_between"] = cache["model.model.layers.3.mlp.act_fn"].output         # gathered at the end

    with model.trace(PROMPTS[0]) as tracer:                           # sharded, then gathered
        sharded = tracer.cache(modules=[layers[0].self_attn.q_proj, layers[0].mlp.down_proj, layers[3].mlp,
                                        layers[3].self_attn.q_proj], include_inputs=True, sharded=True)
    gathered = sharded.gather(dst=0)
    if gathered is not None:  # only the replica's first rank assembles it
        v["sharded_colwise_output"] = gathered["model.model.layers.0.self_attn.q_proj"].output
        v["sharded_rowwise_input"] = gathered["model.model.layers.0.mlp.down_proj"].input
        v["sharded_stage1"] = gathered["model.model.layers.3.mlp"].output
        v["sharded_stage1_colwise"] = gathered["model.model.layers.3.self_attn.q_proj"].output

    with model.trace(PROMPTS[0]):                                     # .source operations
        q_op = layers[0].self_attn.source.self_q_proj_0.output.save()    # a colwise child call
        op = layers[3].self_attn.source.self_o_proj_0.output.save()      # stage 1, a child call
    v.update(source_stage1=op, source_colwise=q_op)

    with model.scan(PROMPTS[0]):                                      # shapes only, no compute
        q_shape = layers[0].self_attn.q_proj.output.shape
        d_shape = layers[3].mlp.down_proj.input.shape
        l_shape = model.lm_head.output.shape
    v["scan_shapes"] = torch.tensor([*q_shape, *d_shape, *l_shape])

    v["param_colwise"] = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    with model.generate(PROMPTS[1], max_new_tokens=3, do_sample=False) as tracer:
        steps = nd.save([])
        for _ in tracer.iter[:3]:
            steps.append(layers[3].output[:, -1].clone())             # stage 1 at every step
        tokens = tracer.result.save()
    v["generate_steps"] = torch.stack(steps)
    v["generate_tokens"] = tokens
    return {k: t.detach().clone() for k, t in v.items()}


def assert_conformance(results: list[dict], expected: dict, per_replica: int, label: str) -> None:
    """``results`` (one dict of :func:`trace_values` per rank; ``per_replica`` = tp·pp
    ranks per replica) against ``expected`` (one process): the same names (the sharded
    cache is gathered on each replica's first rank only), shapes, values within 1e-4
    relative, and bit-identical across every rank of the run."""
    for rank, values in enumerate(results):
        first = rank % per_replica == 0
        names = set(expected) if first else {k for k in expected if not k.startswith("sharded_")}
        assert set(values) == names, f"{label} rank {rank}: {sorted(set(values) ^ names)}"
        for name in names:
            want, got = expected[name], values[name]
            assert got.shape == want.shape, f"{label} rank {rank} {name}: {tuple(got.shape)} vs {tuple(want.shape)}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} rank {rank} {name}: {m}")
    for rank, values in enumerate(results[1:], 1):
        for name in values:
            assert torch.equal(values[name], results[0][name]), f"{label}: {name} differs on rank {rank}"

