"""Quickstart: trace a locally built tiny Llama, read activations and patch one prompt with another.

    python examples/quickstart.py [--arch llama|gpt2|qwen2] [--model-dir DIR]

Nothing is downloaded: the model and its tokenizer are built on the spot (deterministic
weights) by ``nd.testing.make_tiny_model``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import nnsight_dist as nd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2", "qwen2"])
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "nnsight_dist_quickstart"))
    args = parser.parse_args()

    path = nd.testing.make_tiny_model(os.path.join(args.model_dir, args.arch), arch=args.arch)
    model = nd.LanguageModel(path)
    layers = model.model.layers if args.arch != "gpt2" else model.transformer.h
    last = len(layers) - 1

    clean, corrupt = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            hidden = layers[1].output[:, -1]
            barrier()
            clean_logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(corrupt):
            barrier()
            layers[1].output[:, -1] = hidden
            norm = layers[last].output.norm(dim=-1).save()
            patched_logits = model.lm_head.output[:, -1].save()

    with model.trace(corrupt):
        corrupt_logits = model.lm_head.output[:, -1].save()

    with model.generate(clean, max_new_tokens=3, do_sample=False) as tracer:
        steps = nd.save([])
        for _ in tracer.iter[:3]:
            steps.append(model.lm_head.output[:, -1].argmax(-1).item())

    print(f"model: {args.arch}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"hidden-state norms of the last layer (patched run): {[round(x, 3) for x in norm[0].tolist()]}")
    print(f"top token, clean:    {model.tokenizer.decode(clean_logits.argmax(-1))!r}")
    print(f"top token, corrupt:  {model.tokenizer.decode(corrupt_logits.argmax(-1))!r}")
    print(f"top token, patched:  {model.tokenizer.decode(patched_logits.argmax(-1))!r}")
    print(f"patch moved the corrupt logits by {torch.dist(patched_logits, corrupt_logits).item():.4f}")
    print(f"greedy tokens of 3 generation steps: {steps}")


if __name__ == "__main__":
    main()
