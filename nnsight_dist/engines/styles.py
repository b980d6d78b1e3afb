"""Tensor-parallel styles: what a column- or row-parallel layer looks like at its boundaries,
and what that makes of the modules around it.

Engines name each tensor-parallel module's style (``"colwise"``, ``"rowwise"``...) from
their own description of it (transformers' plan, DeepSpeed's module classes, the DTensor
layouts of torch's parallel styles); the placements of the modules the engine does not
name follow from those here: a module run between a column- and a row-parallel layer sees
this rank's slice, and an attention returns its heads' weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from ..distributed.placement import LOCAL, WHOLE, mapping_of, shard, tuple_of

#: Module-boundary placements of transformers' tensor-parallel styles: (input, output).
STYLES = {
    "colwise": (WHOLE, shard(-1)),
    "rowwise": (shard(-1), WHOLE),
    "rowwise_split_input": (WHOLE, WHOLE),  # cuts its whole input itself, then reduces
    "colwise_gather_output": (WHOLE, WHOLE),
    "embedding_rowwise": (WHOLE, WHOLE),
}


def between_parallel_layers(model: torch.nn.Module, styles: dict[str, Optional[str]]) -> dict[str, tuple[str, str]]:
    """Modules the plan does not name that run between a column- and a row-parallel layer.

    In a module whose children include both (an MLP, an attention), the other children see
    this rank's slice of the column-parallel output: a child without parameters (the MLP's
    activation) is elementwise on that slice, ``shard(-1)`` in and out; a child with
    parameters (a per-head norm, say) holds a fragment whose layout the plan does not give
    (``LOCAL``: reading it is refused rather than shown as the whole value).
    """
    found = {}
    for name, module in model.named_modules():
        kids = {f"{name}.{k}" if name else k: c for k, c in module.named_children()}
        kinds = {STYLES.get(styles.get(k), (WHOLE, WHOLE)) for k in kids if styles.get(k)}
        if not any(out != WHOLE for _, out in kinds) or not any(inp != WHOLE for inp, _ in kinds):
            continue
        for child_name, child in kids.items():
            if styles.get(child_name) is None:
                placed = shard(-1) if not any(True for _ in child.parameters()) else LOCAL
                for sub, _ in child.named_modules():
                    found[f"{child_name}.{sub}" if sub else child_name] = (placed, placed)
    return found


#: The dimension of the heads in the attention weights transformers' attention functions
#: return (``eager_attention_forward``: ``[batch, heads, query, key]``).
ATTENTION_WEIGHTS_HEADS = 1


def attention_outputs(model: torch.nn.Module, styles: dict[str, Optional[str]]) -> dict[str, str]:
    """The output placement of each tensor-parallel attention: ``(whole, shard(1))``.

    A transformers attention returns ``(attn_output, attn_weights)``. ``attn_output`` comes
    out of the row-parallel ``o_proj`` (reduced: whole); the weights are computed per head
    from the column-parallel ``q_proj``/``k_proj`` outputs, whose columns are this rank's
    heads, so each rank holds its heads: a shard along the heads dimension. An attention is
    a module with column-parallel ``q_proj`` and ``k_proj`` and a row-parallel ``o_proj`` in
    the plan. Another module with column- and row-parallel children (an MLP; an attention
    whose layers have other names, Phi's ``dense``, say) returns the row-parallel output
    whole: ``(whole)``, a tensor shown whole, or the first element of a tuple, whose other
    elements (weights computed from this rank's columns, perhaps) are refused.
    """
    found = {}
    for name, module in model.named_modules():
        kid = {k: styles.get(f"{name}.{k}" if name else k) for k, _ in module.named_children()}
        if kid.get("q_proj") == "colwise" and kid.get("k_proj") == "colwise" and kid.get("o_proj") == "rowwise":
            found[name] = tuple_of(WHOLE, shard(ATTENTION_WEIGHTS_HEADS))
            continue
        kinds = [STYLES[s] for s in kid.values() if s in STYLES]
        if any(out != WHOLE for _, out in kinds) and any(inp != WHOLE for inp, _ in kinds):
            found[name] = tuple_of(WHOLE)
    return found


def model_outputs(model: torch.nn.Module, styles: dict[str, Optional[str]]) -> dict[str, str]:
    """The output placement of the model and of its base model when a layer is tensor-parallel:
    their ``ModelOutput``'s ``attentions`` (``output_attentions=True``) holds each layer's
    attention weights of this rank's heads, nested in a tuple no codec assembles: refused
    (``local``); the other fields (the logits, the hidden states) are whole."""
    if not styles:
        return {}
    fields = mapping_of({"attentions": LOCAL})
    return {"": fields, getattr(model, "base_model_prefix", ""): fields}


def undescribed_ancestors(model: torch.nn.Module, names: set[str]) -> dict[str, str]:
    """``(whole)`` for every module above the modules ``names`` (layers an engine swapped in
    and does not describe), but the model and its base model (:func:`model_outputs`): what
    such a module returns beyond its first element may come from those layers' fragments."""
    keep = {"", getattr(model, "base_model_prefix", "")}
    return {prefix: tuple_of(WHOLE) for name in names for prefix in _prefixes(name) if prefix not in keep}


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def positional_input(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` of a tensor-parallel layer whose style reads its input positionally
    (``args[0]``: transformers' and torch's alike), taking it as a keyword too:
    ``module(input=x)`` runs as ``module(x)``, as the unsharded layer would."""
    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not args and len(kwargs) == 1:
            args, kwargs = tuple(kwargs.values()), {}
        return forward(*args, **kwargs)
    return call

