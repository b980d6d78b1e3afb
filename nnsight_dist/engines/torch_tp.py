"""The torch engine: ``torch.distributed.tensor.parallel.parallelize_module`` on our mesh.

Loading reads the plain checkpoint (at ``pp > 1``: this stage's layers, through the
transformers engine's layer split and placeholders) and applies torch's own parallel
styles on this replica's tensor-parallel sub-mesh (``topo.mesh["tp"]``: each ``dp``
replica and each stage has its own). The plan is the model's transformers plan
(``tp_plan``), its style names translated to torch's :class:`ParallelStyle` objects
(:func:`_torch_styles`); parameters become ``DTensor`` shards.

Where a visit sits. ``parallelize_module`` installs each style's input and output
transforms as forward (pre-)hooks, which run *around* ``module.forward``, the call point
of our interleaver: inside them a visit would see the style's ``DTensor`` values (a
row-parallel output as a partial sum not yet reduced). The engine moves each style's hooks
into the module's forward (as transformers installs its own styles), so a visit sees the
module's boundary values: the local tensors the style's layouts describe. Placements are
read from the applied style objects: a local input annotated ``input_layouts`` and a local
output laid out as ``output_layouts`` (``Replicate`` whole, ``Shard(d)`` a slice along
``d``); the modules around them follow from :mod:`.styles`, owner stages from
transformers' layer split (:func:`.transformers.placements`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..distributed.placement import LOCAL, PARTIAL, WHOLE, Placement, shard
from ..distributed.topology import Topology
from ..intervention.errors import UnshardableModel
from . import transformers as hf
from .styles import STYLES, positional_input

name = "torch"
#: DTensor operations and redistributions are differentiable, and stages' transfers go
#: over the router (as the transformers engine's).
backward_refused = None
#: The attribute of a loaded model holding ``{module name: ParallelStyle}`` for every module
#: the plan names (placeholders of other stages included, as their owner applies it).
STYLES_ATTRIBUTE = "_nd_parallel_styles"


def _torch_styles() -> dict[str, Callable[[], Any]]:
    """transformers' plan style names, as torch parallel styles (a new object per module)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_gather_output": functools.partial(ColwiseParallel, output_layouts=Replicate()),
        # A vocabulary-parallel embedding: replicated token ids, a reduced output.
        "embedding_rowwise": functools.partial(RowwiseParallel, input_layouts=Replicate()),
    }


def check(config: Any, tp: int, pp: int) -> None:
    """As the transformers engine (whose plan and layer split this engine applies), and
    :class:`UnshardableModel` for a style of the base model's plan torch has none for."""
    hf.check(config, tp, pp)
    if tp > 1:
        _refuse_unknown(type(config).__name__, (config.base_model_tp_plan or {}).values())


def _refuse_unknown(model: str, styles: Any) -> None:
    known = _torch_styles()
    unknown = sorted(set(styles) - set(known))
    if unknown:
        raise UnshardableModel(f"{model}'s tensor-parallel plan uses {', '.join(unknown)}, which engine='torch' "
                               f"has no parallel style for (it has {', '.join(known)}): use engine='transformers'")


def plan(model: torch.nn.Module) -> dict[str, Any]:
    """``{module name: ParallelStyle}`` for each module the model's transformers plan names;
    :class:`UnshardableModel` for a plan style torch has no parallel style for."""
    names = hf.plan_styles(model)
    _refuse_unknown(type(model).__name__, names.values())
    makers = _torch_styles()
    return {module_name: makers[style]() for module_name, style in names.items()}


def load(path: str, topo: Topology, **kwargs: Any) -> torch.nn.Module:
    """This rank's part of the checkpoint at ``path``: its stage's layers, parallelized over
    its replica's tensor-parallel mesh."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    check(config, topo.tp, topo.pp)
    model = hf.load_split(path, topo, 1, **kwargs)
    styles = plan(model) if topo.tp > 1 else {}
    if styles:
        parallelize(model, topo.mesh["tp"], styles)
    setattr(model, STYLES_ATTRIBUTE, styles)
    return model


def parallelize(model: torch.nn.Module, mesh: Any, styles: dict[str, Any]) -> None:
    """``parallelize_module`` with ``styles`` on the modules holding their weights (the
    placeholders of other stages hold none), each style's hooks moved into its module's
    forward (see the module docstring)."""
    from torch.distributed.tensor.parallel import parallelize_module

    modules = dict(model.named_modules())
    held = {n: s for n, s in styles.items() if any(True for _ in modules[n].parameters())}
    before = {n: (set(modules[n]._forward_pre_hooks), set(modules[n]._forward_hooks)) for n in held}
    # Every rank loaded the same weights: each keeps its own slice, no scatter from a source rank.
    parallelize_module(model, mesh, held, src_data_rank=None)
    for module_name, (pre, post) in before.items():
        _hooks_into_forward(modules[module_name], pre, post)


def _hooks_into_forward(module: torch.nn.Module, pre_before: set, post_before: set) -> None:
    """Move the forward (pre-)hooks ``module`` gained since ``*_before`` into its forward,
    with the semantics of ``Module.__call__``: a pre-hook's result replaces the
    positional arguments, a hook's result replaces the output."""
    kwargs_hooks = set(module._forward_pre_hooks_with_kwargs) | set(module._forward_hooks_with_kwargs)
    pre = {k: h for k, h in module._forward_pre_hooks.items() if k not in pre_before}
    post = {k: h for k, h in module._forward_hooks.items() if k not in post_before}
    if not pre or not post:
        # Placements assume the style's transforms run outside the visit: fail loudly the
        # day torch installs them another way.
        raise RuntimeError(f"torch {torch.__version__}'s parallelize_module installed no forward hooks on "
                           f"{type(module).__name__}; engine='torch' expects its styles to transform inputs "
                           "and outputs in hooks (as torch 2.13 does): use engine='transformers'")
    if kwargs_hooks & (set(pre) | set(post)):
        raise UnshardableModel(f"a parallel style of {type(module).__name__} hooks keyword arguments, which "
                               "engine='torch' does not move into the forward")
    for k in pre:
        del module._forward_pre_hooks[k]
    for k in post:
        del module._forward_hooks[k]
        module._forward_hooks_always_called.pop(k, None)
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        for hook in pre.values():
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
        out = inner(*args, **kwargs)
        for hook in post.values():
            result = hook(module, args, out)
            if result is not None:
                out = result
        return out

    module.forward = positional_input(forward)


def layout(placement: Any) -> str:
    """Our placement of a local tensor with the DTensor ``placement``."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    if isinstance(placement, Replicate):
        return WHOLE
    if isinstance(placement, Shard):
        return shard(placement.dim)
    if isinstance(placement, Partial):
        return PARTIAL
    return LOCAL


def boundary(style: Any) -> tuple[str, str]:
    """``(input, output)`` placement a visit sees at a module of ``style``: its input is a
    local tensor annotated ``input_layouts``; its output the local tensor of
    ``output_layouts`` (a ``DTensor`` output, ``use_local_output=False``, is not described)."""
    out = layout(style.output_layouts[0]) if style.use_local_output else LOCAL
    return layout(style.input_layouts[0]), out


def style_names(model: torch.nn.Module) -> dict[str, str]:
    """The :data:`.styles.STYLES` name of each parallelized module's boundary placements."""
    names = {}
    for module_name, style in getattr(model, STYLES_ATTRIBUTE).items():
        pair = boundary(style)
        found = next((k for k, v in STYLES.items() if v == pair), None)
        if found is None:
            raise UnshardableModel(f"{module_name}: {style} gives input {pair[0]} and output {pair[1]}, "
                                   "which no tensor-parallel style describes")
        names[module_name] = found
    return names


def placements(model: torch.nn.Module, topo: Topology, root: str = "model") -> dict[str, Placement]:
    """The placement of every module of ``model``: owner stages from transformers' layer
    split, tensor-parallel placements from the applied parallel styles."""
    return hf.placements(model, topo, root, styles=style_names(model))


def opaque_types(topo: Topology) -> tuple[type, ...]:
    """As the transformers engine: at tp > 1 the key/value cache holds this rank's heads."""
    return hf.opaque_types(topo)


def attach_pipeline(model: torch.nn.Module, topo: Topology, interleaver: Any, router: Any, root: str = "model") -> None:
    """The transformers engine's stage transfers (this engine uses its layer split)."""
    hf.attach_pipeline(model, topo, interleaver, router, root)
