"""Quickstart: trace a tiny Llama sharded over ranks; read on each stage, patch stage 0 into stage 1.

    launch/torchrun.sh 4 examples/quickstart.py --tp 2 --pp 2     # 4 CPU ranks, tp=2 × pp=2
    launch/mpirun.sh 4 examples/quickstart.py --tp 2 --pp 2
    python examples/quickstart.py                                 # one process

Nothing is downloaded: rank 0 builds the model and its tokenizer on the spot
(deterministic weights, ``nd.testing.make_tiny_model``); each rank loads only its part.
Every rank computes the same values; rank 0 prints them once.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import nnsight_dist as nd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "nnsight_dist_quickstart"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    topo = nd.init(tp=args.tp, pp=args.pp)
    path = os.path.join(args.model_dir, args.arch)
    if topo.rank == 0:
        nd.testing.make_tiny_model(path, arch=args.arch)
    nd.broadcast_object(path)  # the others wait until rank 0 has written it

    model = nd.LanguageModel(path, tp=args.tp, pp=args.pp)
    layers = model.model.layers
    first, last = 0, len(layers) - 1  # with pp=2: one on stage 0, one on stage 1

    clean, corrupt = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            hidden = layers[first].output[:, -1]                  # read on stage 0
            barrier()
            clean_logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(corrupt):
            barrier()
            layers[last - 1].output[:, -1] = hidden                # patch into stage 1
            norm = layers[last].output.norm(dim=-1).save()         # read on stage 1
            patched_logits = model.lm_head.output[:, -1].save()

    with model.trace(corrupt):
        corrupt_logits = model.lm_head.output[:, -1].save()

    with model.generate(clean, max_new_tokens=3, do_sample=False) as tracer:
        steps = nd.save([])
        for _ in tracer.iter[:3]:
            steps.append(layers[last].output[:, -1].norm().item())

    if topo.rank == 0:
        place = model.placement(f"model.model.layers.{last}.mlp.down_proj")
        decode = model.tokenizer.decode
        print(f"topology: world {topo.world_size} = dp {topo.dp} x pp {topo.pp} x tp {topo.tp} ({topo.launcher})")
        print(f"placement: {place}")
        print(f"last-layer norms, patched run: {[round(x, 3) for x in norm[0].tolist()]}")
        print(f"top token  clean {decode(clean_logits.argmax(-1))!r}  corrupt {decode(corrupt_logits.argmax(-1))!r}"
              f"  patched {decode(patched_logits.argmax(-1))!r}")
        print(f"the patch moved the corrupt logits by {torch.dist(patched_logits, corrupt_logits).item():.4f}")
        print(f"last-layer norm at each of 3 generation steps: {[round(x, 4) for x in steps]}")


if __name__ == "__main__":
    main()
