"""Cost of a trace with a backward block, against plain PyTorch (one process) and against a
hand-written pipelined backward (pp=2).

What is measured
----------------
The wall-clock time (rank 0's clock) of one forward + backward of a tiny Llama
(``nd.testing.make_tiny_model(dir, arch="llama")``: 4 layers, hidden 128) on a 19-token
prompt, reading the gradients of layer 1's and layer 3's outputs and doubling layer 3's
(so layer 1's changes). Variants, timed in rotating order (``common.measure_rotating``):

* one process (``python benchmarks/backward.py``):

  - ``torch``: the plain transformers model: forward hooks on layers 1 and 3 register
    tensor hooks on their outputs (the one on layer 3 doubles its gradient), then
    ``loss.backward()``;
  - ``nnsight_dist``: ``with model.trace(batch):`` reading both outputs and
    ``with loss.backward(): h3.grad = h3.grad * 2; g3 = h3.grad.save(); g1 = h1.grad.save()``.

* pp=2 (``torchrun --nproc-per-node 2 benchmarks/backward.py --pp 2``): the same trace on
  the pipeline-sharded model (layers 0-1 on stage 0, 2-3 on stage 1), against ``p2p``: the
  same sharded module made a pipeline by hand with blocking ``torch.distributed`` sends and
  receives on a group of its own: hidden states forward, logits to stage 0, the hidden
  states' gradient back, and ``torch.autograd.backward(sent, gradient)`` on stage 0; the
  same tensor hooks. No nnsight_dist code runs in ``p2p``. nnsight_dist moves more: every
  value and gradient the body reads reaches every rank (the router's traffic is printed).

Every variant's gradients are compared with the one-process ``torch`` ones first (on every
rank, for the gradients that rank computes), then timed. The loss is
``logits[0, -1].logsumexp(-1)``; parameters' ``.grad`` are reset after each run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

import torch

import nnsight_dist as nd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find common.py
import common  # noqa: E402
from common import PROMPT, say  # noqa: E402

LOW, HIGH = 1, 3  # the layers whose output gradients are read; HIGH's is doubled


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def torch_run(ref: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: forward hooks put tensor hooks on the two outputs, then backward."""
    grads: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Callable:
        def on_grad(g: torch.Tensor) -> torch.Tensor:
            g = g * 2 if i == HIGH else g
            grads[i] = g
            return g

        def hook(module, args, out) -> None:
            _first(out).register_hook(on_grad)

        return hook

    layers = ref.model.layers
    with common.hooks([(layers[LOW], keep(LOW)), (layers[HIGH], keep(HIGH))]):
        logits = ref(**batch).logits
    logits[0, -1].logsumexp(-1).backward()
    ref.zero_grad(set_to_none=True)
    return grads[HIGH], grads[LOW]


def nd_run(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    layers = model.model.layers
    with model.trace(batch):
        h1 = layers[LOW].output
        h3 = layers[HIGH].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            h3.grad = h3.grad * 2
            g3 = h3.grad.save()
            g1 = h1.grad.save()
    model._module.zero_grad(set_to_none=True)
    return g3, g1


def p2p_run(model: Any, batch: Any, group: Any) -> tuple[Any, Any]:
    """The pipelined forward and backward by hand (pp=2): ``(g3, None)`` on stage 1,
    ``(None, g1)`` on stage 0."""
    import torch.distributed as dist

    topo = model.topology
    module = model._module
    layers = module.model.layers
    grads: dict[int, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    handles = []

    def keep(i: int) -> Callable:
        def on_grad(g: torch.Tensor) -> torch.Tensor:
            g = g * 2 if i == HIGH else g
            grads[i] = g
            return g

        return on_grad

    def grad_hook(module, args, out) -> None:
        _first(out).register_hook(keep(HIGH))

    if topo.pp_rank == 0:
        def send_hidden(mod, args, out):
            kept["sent"] = out
            out.register_hook(keep(LOW))
            dist.send(out.detach().contiguous(), dst=1, group=group)

        def receive_logits(mod, args, out):
            got = torch.empty(*out.shape[:-1], module.config.vocab_size, dtype=out.dtype)
            dist.recv(got, src=1, group=group)
            return got

        handles += [layers[LOW].register_forward_hook(send_hidden), module.lm_head.register_forward_hook(receive_logits)]
    else:
        def receive_hidden(mod, args, kwargs):
            shape_of = args[0] if args else kwargs["hidden_states"]
            hidden = torch.empty_like(shape_of)
            dist.recv(hidden, src=0, group=group)
            kept["leaf"] = leaf = hidden.requires_grad_()
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf}

        def send_logits(mod, args, out):
            dist.send(out.detach().contiguous(), dst=0, group=group)

        handles += [layers[LOW + 1].register_forward_pre_hook(receive_hidden, with_kwargs=True),
                    layers[HIGH].register_forward_hook(grad_hook),
                    module.lm_head.register_forward_hook(send_logits)]
    try:
        logits = module(**batch).logits
    finally:
        for h in handles:
            h.remove()
    if topo.pp_rank == 1:
        logits[0, -1].logsumexp(-1).backward()
        dist.send(kept["leaf"].grad.contiguous(), dst=0, group=group)
    else:
        gradient = torch.empty_like(kept["sent"])
        dist.recv(gradient, src=1, group=group)
        torch.autograd.backward(kept["sent"], gradient)
    module.zero_grad(set_to_none=True)
    return grads.get(HIGH), grads.get(LOW)


def check(name: str, got: tuple, want: tuple) -> str:
    """``""`` when every gradient ``got`` holds (``None``: not on this rank) is ``want``'s."""
    problems = [common.same(w, g) for g, w in zip(got, want) if g is not None]
    problems = [p for p in problems if p]
    return f"{name}: {'; '.join(problems)}" if problems else ""


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--pp", type=int, default=1, help="1 (one process) or 2 (under torchrun, 2 ranks)")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.pp not in (1, 2):
        parser.error("--pp must be 1 or 2")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    topo = nd.init(pp=args.pp) if args.pp > 1 else None
    rank = topo.rank if topo is not None else 0
    root = tempfile.mkdtemp(prefix="nd_backward_") if rank == 0 else None
    if topo is not None:
        root = nd.broadcast_object(root)
    path = os.path.join(root, "llama")
    if rank == 0:
        nd.testing.make_tiny_model(path, arch="llama")
    if topo is not None:
        nd.broadcast_object(0)  # the others wait until rank 0 has written it
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    model = nd.LanguageModel(path, pp=args.pp)
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    want = torch_run(ref, batch)
    runners: dict[str, Callable[[], tuple]] = {"nnsight_dist": lambda: nd_run(model, batch)}
    if args.pp == 1:
        runners["torch"] = lambda: torch_run(ref, batch)
        base = "torch"
    else:
        import torch.distributed as dist

        group = dist.new_group(topo.replica_ranks(), backend="gloo")
        runners["p2p"] = lambda: p2p_run(model, batch, group)
        base = "p2p"
    problems = [p for name, run in runners.items() for p in [check(name, run(), want)] if p]
    if topo is not None:
        problems = [p for found in nd.gather_object(problems) or [] for p in found]
    traffic = {}
    if args.pp > 1:
        nd_run(model, batch)
        traffic = dict(model.interleaver.seam.router.traffic)
    variants = [base, "nnsight_dist"]
    times = common.measure_rotating(lambda v, _: runners[v](), ["backward"], variants, args.reps, args.warmup,
                                    "backward", rank == 0)
    if rank == 0:
        for p in problems:
            say(f"CHECK FAILED: {p}")
        per = times["backward"]
        diff, se = common.paired(per["nnsight_dist"], per[base])
        body = [[v, f"{common.median_ms(per[v]):.2f}", f"{common.median_ms(per[v]) / common.median_ms(per[base]):.2f}"]
                for v in variants]
        print(f"\nforward + backward, {'one process' if args.pp == 1 else 'pp=2'}, {args.reps} repetitions "
              f"(rotating), torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(common.render(["variant", "ms", f"x {base}"], body, args.markdown))
        print(f"nnsight_dist - {base}: {common.pm(diff, se)} ms (median of paired differences ± s.e.)")
        if traffic:
            kinds = ", ".join(f"{k}: {n} msg {b / 1024:.1f} KiB" for k, (n, b) in sorted(traffic.items()))
            print(f"router traffic of one nnsight_dist trace on rank 0: {kinds}")
        print("checks: " + ("all gradients equal the one-process torch ones" if not problems else "FAILED (above)"))
    if topo is not None:
        nd.broadcast_object(0)  # everyone is done with the files
    if rank == 0:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
