"""The router's data path at pp=2: what arrives equals what was sent, on the host path and
on the device path (run on CPU over gloo here, over NCCL on CUDA); a served value the
engine carries rides on the engine's message unless it changed; a trace ends with one
collective."""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.testing.ranks import run_ranks


def _values() -> list:
    """Values of every shape of message: dtypes whose sizes break 8-byte alignment, an empty
    tensor, a non-contiguous one, a message longer than one receive, nested structure."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 20000, generator=g)  # 240 000 bytes: longer than a receive slot
    return [
        torch.randn(1, 19, 128, generator=g),
        {"a": torch.arange(7, dtype=torch.int16), "b": [torch.tensor([True, False, True]), 3, "x", None],
         "c": (torch.randn(5, generator=g).to(torch.bfloat16), torch.zeros(0, 4))},
        torch.randn(6, 4, generator=g).t(),
        big,
        [torch.arange(3, dtype=torch.uint8), big[:, :5]],
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),  # no bytes at all (none on the device)
        None,
    ]


def _send_receive(rank: int, device_path: bool) -> list:
    import torch.distributed as dist
    from nnsight_dist.distributed.failure import Failures
    from nnsight_dist.distributed.router import Router

    topo = nd.init(pp=2)
    groups = None
    if device_path:
        # What topology builds on CUDA (a group per direction), here with gloo on the host.
        to_one, to_zero = dist.new_group([0, 1]), dist.new_group([0, 1])
        groups = {1 - rank: (to_one, to_zero) if rank == 0 else (to_zero, to_one)}
    router = Router(topo, Failures(topo), topo.group("router"), groups, torch.device("cpu") if groups else None)
    router.next_trace()
    got = []
    values = _values()
    for i, value in enumerate(values):
        if rank == 0:
            router.send(1, ("t", i), value)
        else:
            got.append(router.wait(("t", i), "a test value", 0))
    if rank == 0:
        # Both ways at once: every stream has its own thread and (device path) group.
        got = [router.wait(("back", i), "a test value", 1) for i in range(len(values))]
    else:
        for i, value in enumerate(values):
            router.send(0, ("back", i), value)
    router.complete_sends()
    router.close()
    return got


def _same(a, b) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b)
        for k in b:
            _same(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("device_path", [False, True], ids=["host", "device_path_on_gloo"])
def test_values_arrive_as_sent(device_path):
    results = run_ranks(_send_receive, 2, device_path, timeout=120)
    for got in results:
        _same(got, _values())


def _cuda_values(rank: int) -> list:
    from nnsight_dist.distributed.replica import shared_router

    topo = nd.init(pp=2)
    router = shared_router(topo)
    assert router.device_groups, "on CUDA the router's tensors travel on NCCL groups"
    router.next_trace()
    values = [v.cuda() if isinstance(v, torch.Tensor) else v for v in _values()[:1] + _values()[3:4]]
    if rank == 0:
        for i, v in enumerate(values):
            router.send(1, ("t", i), v)
        router.complete_sends()
        return []
    return [router.wait(("t", i), "a test value", 0).cpu() for i in range(len(values))]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL payload path needs two CUDA devices")
def test_values_arrive_as_sent_cuda():
    _, got = run_ranks(_cuda_values, 2, timeout=180)
    _same(got, _values()[:1] + _values()[3:4])


def _carried(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, pp=2)
    router = model.interleaver.seam.router
    out = {}
    with model.trace("Hello world"):
        a = model.model.layers[1].output.save()            # stage 0's last layer: what `h` carries
    out["read"], out["read_traffic"] = a, dict(router.traffic)
    with model.trace("Hello world"):
        b = model.model.layers[1].output.save()
        model.model.layers[1].output = b * 2                # replaced: `h` carries another tensor
        z = model.lm_head.output.save()
    out["replaced"], out["replaced_logits"], out["replaced_traffic"] = b, z, dict(router.traffic)
    with model.trace("Hello world"):
        c = model.model.layers[1].output.clone().save()
        model.model.layers[1].output[:, -1] = 0             # edited in place after the read
        y = model.lm_head.output.save()
    out["edited"], out["edited_logits"], out["edited_traffic"] = c, y, dict(router.traffic)
    ledger = dict(model.interleaver.seam.failures.ledger)
    out["collectives"] = len(ledger.get("replica", []))
    return out


def _reference(path: str) -> dict:
    """The same three traces in plain PyTorch: forward hooks on one process's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)("Hello world", return_tensors="pt")
    layer = model.model.layers[1]
    ref = {}
    with torch.no_grad():
        handle = layer.register_forward_hook(lambda m, a, o: ref.__setitem__("h", o.clone()))
        model(**batch)
        handle.remove()
        handle = layer.register_forward_hook(lambda m, a, o: o * 2)
        ref["doubled"] = model(**batch).logits
        handle.remove()

        def zero_last(m, a, o):
            o = o.clone()
            o[:, -1] = 0
            return o
        handle = layer.register_forward_hook(zero_last)
        ref["zeroed"] = model(**batch).logits
        handle.remove()
    return ref


def test_engine_carries_served_values(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    ref = _reference(path)
    stage0, stage1 = run_ranks(_carried, 2, path, timeout=180)
    for r in (stage0, stage1):
        torch.testing.assert_close(r["read"], ref["h"])
        torch.testing.assert_close(r["replaced"], ref["h"])
        torch.testing.assert_close(r["replaced_logits"], ref["doubled"])
        torch.testing.assert_close(r["edited"], ref["h"])
        torch.testing.assert_close(r["edited_logits"], ref["zeroed"])
    # Unchanged, the read rides on the hidden states; replaced or edited in place, what was
    # served travels on its own (the edit's own read of the output is a served request too).
    assert "v" not in stage0["read_traffic"] and stage0["read_traffic"]["h"][0] == 1
    assert stage0["replaced_traffic"]["v"][0] == 1 and stage0["edited_traffic"]["v"][0] >= 1
    # The end of a trace: the input check and the digest barrier, nothing else.
    assert stage0["collectives"] == stage1["collectives"] == 2


def _unsupported_dtype(rank: int) -> list:
    from nnsight_dist.distributed.failure import Failures
    from nnsight_dist.distributed.router import Router

    topo = nd.init(pp=2)
    router = Router(topo, Failures(topo), topo.group("router"))
    router.next_trace()
    out = []
    if rank == 0:
        try:
            router.send(1, ("t", 0), torch.ones(2, dtype=torch.complex64))
        except TypeError as error:
            out.append(str(error))
        router.send(1, ("t", 1), torch.ones(2))
    else:
        out.append(router.wait(("t", 1), "a test value", 0))
    router.complete_sends()
    router.close()
    return out


def test_unsupported_dtype_refused_by_the_sender_stream_intact():
    sender, receiver = run_ranks(_unsupported_dtype, 2, timeout=120)
    assert "torch.complex64 cannot travel between ranks" in sender[0]
    assert torch.equal(receiver[0], torch.ones(2))


def _order_and_data_edits(model) -> dict:
    """Three invokes read the stage-boundary value the engine carries (the whole batch first,
    then each row), in order; a ``.data`` edit (no version bump) of that value."""
    out = {}
    for name, module in (("boundary", model.model.layers[1]), ("logits", model.lm_head)):
        with model.trace() as tracer:
            order = nd.save([])
            with tracer.invoke():
                module.output
                order.append(0)
            with tracer.invoke("Hello world"):
                module.output
                order.append(1)
            with tracer.invoke("The cat sat"):
                module.output
                order.append(2)
        out[f"order_{name}"] = torch.tensor(list(order))
    with model.trace("Hello world"):
        h = model.model.layers[1].output
        h.data += 1
        out["data_edit"] = h.save()
        out["data_edit_logits"] = model.lm_head.output.save()
    return {k: v.clone() for k, v in out.items()}


def _order_ranks(rank: int, path: str) -> dict:
    return _order_and_data_edits(nd.LanguageModel(path, pp=2))


def test_carried_values_keep_order_and_edits_without_versions(tmp_path):
    """Mediators served at a carried location resume on the other stage in the order they
    were served (some values ride on the engine's message, some travel before it), and a
    value edited through ``.data`` (same version counter) is not taken as unchanged."""
    path = nd.testing.make_tiny_model(str(tmp_path))
    want = _order_and_data_edits(nd.LanguageModel(path))
    assert want["order_boundary"].tolist() == [0, 1, 2]
    for rank, got in enumerate(run_ranks(_order_ranks, 2, path, timeout=180)):
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, msg=lambda m: f"rank {rank} {name}: {m}")

