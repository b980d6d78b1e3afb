"""Placement strings, refused stand-ins and the assembly of fragments (no ranks needed)."""

from __future__ import annotations

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.distributed.placement import (LOCAL, WHOLE, Refused, assemble, elements, fragmented, mapping_of,
                                                restored, shard, tuple_of)


def test_placement_strings():
    assert elements(WHOLE) is None and elements(shard(-1)) is None
    assert tuple_of(WHOLE, shard(1)) == "(whole, shard(1))"
    assert elements("(whole, shard(1))") == (True, {0: "whole", 1: "shard(1)"})
    assert elements(mapping_of({0: shard(-1), "cache": LOCAL})) == (False, {0: "shard(-1)", "cache": "local"})
    assert not fragmented(WHOLE) and fragmented(shard(0)) and fragmented(tuple_of(WHOLE))
    assert not fragmented(mapping_of({"a": WHOLE})) and fragmented(mapping_of({"a": LOCAL}))


def test_refused_stand_in():
    local = torch.ones(2)
    r = Refused("model.x.output[1]", local)
    for use in (lambda: r.shape, lambda: r[0], lambda: r + 1, lambda: len(r), lambda: bool(r)):
        with pytest.raises(nd.NNsightError, match=r"model\.x\.output\[1\] holds this rank's tensor-parallel fragment"):
            use()
    assert "refused" in repr(r)
    value = (torch.zeros(1), {"cache": r})
    back = restored(value)
    assert back[1]["cache"] is local and back[0] is value[0]


def test_assemble_parts():
    a, b = torch.arange(4.).view(1, 2, 2), torch.arange(4., 8.).view(1, 2, 2)
    out = assemble([(a, a), (a, b)], tuple_of(WHOLE, shard(1)), False, "m.output")
    assert torch.equal(out[0], a) and torch.equal(out[1], torch.cat([a, b], 1))
    extra = assemble([(a, a, a), (a, a, b)], tuple_of(WHOLE, shard(1)), False, "m.output")
    assert isinstance(extra[2], Refused)  # past the listed elements: local
    inputs = assemble([((a,), {"k": a}), ((b,), {"k": a})], shard(-1), True, "m.input")
    assert torch.equal(inputs[0][0], torch.cat([a, b], -1)) and inputs[1]["k"] is a
