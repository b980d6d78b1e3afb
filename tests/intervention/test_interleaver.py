"""The interleaver's synchronous waits (``Interleaver.synchronous``), in one process.

A seam plays a second pipeline stage: one module's ad-hoc calls are "remote", so the
body's call goes to ``Seam.wait_remote``, which the interleaver runs on the model's
greenlet inside the visit in progress. While it waits, the seam delivers another
mediator's remote value (as the router does with arrivals). Both bodies must end with the
values plain PyTorch gives, and the model must stand still during the wait.
"""

from __future__ import annotations

import torch

import nnsight_dist as nd
from nnsight_dist.intervention.seam import Seam


class TwoStages(Seam):
    """``fc2``'s ad-hoc calls and ``fc1.output`` are another stage's (see module docstring)."""

    routing = True

    def __init__(self, model: nd.NNsight, fc1_of_b: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.fc1_of_b = fc1_of_b
        self.remote = {model.fc1._point.output.location, model.fc2._point.output.location}
        self.served_values: dict[tuple[int, int], torch.Tensor] = {}
        self.waited_at: list = []

    def served(self, mediator: int, seq: int, location: str, value) -> None:
        self.served_values[(mediator, seq)] = value

    def wait_remote(self, mediator: int, seq: int, location: str):
        il = self.model.interleaver
        self.waited_at.append((il.location, il.current.index))
        # An arrival while waiting: the other body's remote value, delivered from here.
        assert il.deliver(1, 0, self.fc1_of_b)
        # The owner computes the call (its forward, not a visit) from the value the body
        # was served just before.
        return self.model.fc2._point.forward(self.served_values[(mediator, seq - 1)])


def test_ad_hoc_call_waits_inside_the_visit():
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    for name in ("fc0", "fc1", "fc2"):
        module.add_module(name, torch.nn.Linear(4, 4))
    model = nd.NNsight(module)
    xa, xb = torch.randn(1, 4), torch.randn(1, 4)
    fc1_of_b = module.fc1(module.fc0(xb)).detach()
    seam = model.interleaver.seam = TwoStages(model, fc1_of_b)
    try:
        with model.trace() as tracer:
            with tracer.invoke(xa):
                h = model.fc0.output
                y = model.fc2(h).save()                    # waits inside the fc0 visit
                a_in = model.fc2.input.save()              # the model has not moved on
            with tracer.invoke(xb):
                b1 = model.fc1.output.save()               # delivered during the other's wait
                b_in = model.fc2.input.save()
    finally:
        model.interleaver.seam = Seam()
    with torch.no_grad():
        want_h = module.fc0(xa)
        torch.testing.assert_close(y, module.fc2(want_h))
        torch.testing.assert_close(a_in, module.fc1(want_h))
        torch.testing.assert_close(b1, fc1_of_b)
        torch.testing.assert_close(b_in, fc1_of_b)
    assert seam.waited_at == [(model.fc0._point.output.location, 0)]
