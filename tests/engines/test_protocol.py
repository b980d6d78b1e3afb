"""Every engine implements the engine protocol (``engines/protocol.py``), and ``engine=`` names
are checked before anything is loaded."""

from __future__ import annotations

import inspect

import pytest

import nnsight_dist as nd
from nnsight_dist import engines
from nnsight_dist.engines.protocol import Engine


def _members() -> dict[str, object]:
    """The protocol's members, from the protocol class itself: its annotated attributes and
    its functions (with their signatures)."""
    found: dict[str, object] = {name: None for name in Engine.__annotations__}
    for name, fn in vars(Engine).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            found[name] = inspect.signature(fn)
    return found


@pytest.mark.parametrize("name", list(engines.MODULES))
def test_engine_implements_the_protocol(name):
    engine = engines.get(name)
    members = _members()
    assert {"load", "placements", "attach_pipeline", "backward_refused"} <= set(members)
    assert engine.name == name
    assert engine.backward_refused is None or isinstance(engine.backward_refused, str)
    for member, signature in members.items():
        assert hasattr(engine, member), f"engine {name!r} lacks {member}"
        if signature is None:
            continue
        want = [p for p in signature.parameters if p != "self"]
        got = list(inspect.signature(getattr(engine, member)).parameters)
        assert got[:len(want)] == want, f"engine {name!r}: {member}{got} vs protocol {want}"


def test_unknown_engine_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown engine 'megatron'.*transformers.*deepspeed.*torch"):
        nd.LanguageModel(str(tmp_path / "nothing here"), engine="megatron")
