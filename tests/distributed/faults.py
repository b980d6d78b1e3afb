"""The fault matrix as one sequence: every fault of issue 7's matrix, each followed by a
correct trace. Run in one process it gives the reference (the errors nnsight_dist raises
there, and the correct traces' values); run on forked ranks, every rank must end each
fault with the same error (or a ``RemoteError`` naming it, or naming the rank that
failed alone) and every correct trace must equal the single-process one."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

import nnsight_dist as nd

PROMPT = "The Eiffel Tower is in the city of"

#: One-rank faults: the fault's name -> the rank that fails alone (``-1``: the last rank
#: of the job: stage 1's last tp rank, or the second replica's at dp=2).
ALONE = {"exception on one rank": 1, "exception on the last rank, after a stage-1 edit": -1,
         "exception on one rank before the model runs": 1, "exception on one rank at generation step 1": -1}


def correct(model) -> dict[str, torch.Tensor]:
    """A trace that reads both stages, a row-parallel output and edits stage 1."""
    layers = model.model.layers
    with model.trace(PROMPT):
        down = layers[0].mlp.down_proj.output.save()
        layers[2].mlp.output = layers[2].mlp.output * 0.5
        h3 = layers[3].output.save()
        logits = model.lm_head.output[:, -1].save()
    return {"down": down, "h3": h3, "logits": logits}


def _outcome(fn: Callable[[], Any]) -> dict:
    """What ``fn`` did: the error (type, message, and for a ``RemoteError`` the origin
    rank and the origin's error type), the warnings, and the values it returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = fn() or {}
            error = None
        except Exception as e:
            values, error = {}, e
    out: dict[str, Any] = {"values": {k: v.detach().clone() for k, v in values.items()},
                           # nnsight's warning for a step loop cut short
                           "warnings": [w.category.__name__ for w in caught if "never reached" in str(w.message)]}
    if error is not None:
        out["error"] = type(error).__name__
        out["message"] = str(error)
        if isinstance(error, nd.RemoteError):
            out["origin"] = error.rank
            out["origin_error"] = error.remote_message.split(":", 1)[0]
    return out


def sequence(rank: int, model, eos: int, world: int = 1) -> list[tuple[str, dict, dict]]:
    """Run every fault, each followed by :func:`correct`: ``[(fault, outcome, correct outcome)]``.

    ``eos`` is the greedy first generated token of :data:`PROMPT` (an EOS at step 0)."""
    layers = model.model.layers
    alone = {name: r % world if world > 1 else None for name, r in ALONE.items()}  # one process: nobody
    faults: dict[str, Callable[[], Any]] = {}

    def body_all():
        with model.trace(PROMPT):
            h = layers[0].output.save()
            raise ValueError("boom on every rank")
    faults["exception on all ranks"] = body_all

    def body_one():
        with model.trace(PROMPT):
            x = layers[0].mlp.input
            if rank == alone["exception on one rank"]:
                raise ValueError(f"boom on rank {rank} only")
            u = layers[0].mlp.up_proj.output.save()                # column-parallel: gathered
            y = layers[0].mlp.down_proj.output.save()
            z = model.lm_head.output.save()
    faults["exception on one rank"] = body_one

    def last_one():
        with model.trace(PROMPT):
            layers[2].mlp.output = layers[2].mlp.output * 2
            q = layers[3].self_attn.q_proj.output                  # column-parallel, stage 1
            if rank == alone["exception on the last rank, after a stage-1 edit"]:
                raise ValueError(f"boom on rank {rank} only")
            h = layers[3].mlp.down_proj.input.save()               # row-parallel input: gathered
            z = model.lm_head.output.save()
    faults["exception on the last rank, after a stage-1 edit"] = last_one

    def before_model():
        with model.trace(PROMPT):
            if rank == alone["exception on one rank before the model runs"]:
                raise ValueError(f"boom on rank {rank} only")
            h = layers[3].output.save()
    faults["exception on one rank before the model runs"] = before_model

    def generation_step():
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
            hs = nd.save([])
            for step in tracer.iter[0:3]:
                hs.append(layers[3].mlp.down_proj.input[:, -1].clone())
                if step == 1 and rank == alone["exception on one rank at generation step 1"]:
                    raise ValueError(f"boom on rank {rank} only")
    faults["exception on one rank at generation step 1"] = generation_step

    def after_remote():
        with model.trace(PROMPT):
            h = layers[3].output                                   # stage 1's value on stage 0
            raise ValueError(f"boom after reading {tuple(h.shape)}")
    faults["exception after a value from another stage"] = after_remote

    def out_of_order():
        with model.trace(PROMPT):
            a = layers[2].output.save()
            b = layers[0].output.save()
    faults["out-of-order access"] = out_of_order

    def never_reached():
        with model.trace(PROMPT) as tracer:
            tracer.next()
            h = layers[0].output.save()
    faults["a location never reached"] = never_reached

    def wrong_shape():
        with model.trace(PROMPT):
            layers[1].output = torch.zeros(2, 3)
            z = model.lm_head.output.save()
    faults["a wrong-shape write"] = wrong_shape

    def bad_path():
        with model.trace(PROMPT):
            h = model.model.layerz[0].output.save()
    faults["a bad module path"] = bad_path

    def divergent():
        with model.trace(PROMPT):
            if rank == 0:
                extra = layers[1].output.save()
            h = layers[3].output.save()
    faults["a rank-divergent branch"] = divergent

    def eos_early():
        after = None
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False, eos_token_id=eos, pad_token_id=eos) as tracer:
            hs = nd.save([])
            for step in tracer.all():
                hs.append(layers[3].output[:, -1].clone())
            after = layers[0].output.save()                        # not reached: the loop is cut
        return {"hs": torch.stack(hs), "after the loop ran": torch.tensor(after is not None)}
    faults["generate ending at step 0 (EOS)"] = eos_early

    def loop_too_long():
        with model.generate(PROMPT, max_new_tokens=2, do_sample=False) as tracer:
            hs = nd.save([])
            for step in tracer.iter[0:5]:
                hs.append(layers[3].output[:, -1].clone())
        return {"hs": torch.stack(hs)}
    faults["a step loop longer than the run"] = loop_too_long

    def stop_after(layer: int, key: str):
        def stop():
            with model.trace(PROMPT) as tracer:
                value = layers[layer].output.save()
                tracer.stop()
            return {key: value}
        return stop
    faults["stop() on stage 0"] = stop_after(0, "early")
    faults["stop() on stage 1"] = stop_after(3, "late")

    def stop_step1():
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
            hs = nd.save([])
            for step in tracer.iter[0:3]:
                hs.append(layers[3].output[:, -1].clone())
                if step == 1:
                    tracer.stop()
        return {"hs": torch.stack(hs)}
    faults["stop() at generation step 1"] = stop_step1

    def cache_observer():
        with model.trace(PROMPT) as tracer:
            cache = tracer.cache(modules=[layers[0].mlp.up_proj, layers[0].mlp, layers[3].mlp], dtype="no-such-dtype")
    faults["an exception inside a cache observer"] = cache_observer

    def barrier_short():
        with model.trace() as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(PROMPT):
                h0 = layers[0].output[:, -1]
                barrier()
            with tracer.invoke(PROMPT):
                barrier()
                layers[2].output[:, -1] = h0
                z = model.lm_head.output.save()
    faults["a barrier with too few invokes"] = barrier_short

    results = []
    for name, fn in faults.items():
        results.append((name, _outcome(fn), _outcome(lambda: correct(model))))
    return results
