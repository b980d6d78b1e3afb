"""The transformers engine: its own tensor and pipeline parallelism, described for nnsight_dist.

Loading goes through ``from_pretrained(..., distributed_config=DistributedConfig(tp_size,
pp_size))``, so each rank loads only its part. Two adjustments make it fit:

- the device mesh transformers builds spans the whole world; we hand it this replica's
  ``pp × tp`` slice of our ``dp × pp × tp`` mesh, so ``dp`` replicas each hold a model;
- transformers 5.23 expands its tensor-parallel plan *before* pipeline parallelism turns
  the layers of other stages into placeholders, and then fails on the missing names
  (``KeyError: 'model.embed_tokens.weight'``); we apply the plan to the names that exist.

The engine only *describes*: :func:`placements` reads owner stages from transformers'
layer split and tensor-parallel placements from the model's plan; :func:`attach_pipeline`
puts the engine's blocking points (hidden states from the previous stage, logits from the
last) on the router, as router-aware waits. Every stage runs the whole module tree —
placeholders pass values through — so every rank visits the same locations.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Optional

import torch

from ..distributed.placement import WHOLE, Placement
from ..distributed.topology import Topology
from ..intervention.errors import UnshardableModel
from .styles import STYLES, attention_outputs, between_parallel_layers, model_outputs, positional_input

name = "transformers"
#: Its tensor-parallel layers are DTensor ops and its stages' transfers go over the router:
#: gradients flow through both (see :mod:`..distributed.gradients`).
backward_refused = None

def check(config: Any, tp: int, pp: int) -> None:
    """Raise :class:`UnshardableModel` before loading when ``tp``/``pp`` cannot split the model."""
    name = type(config).__name__
    if tp > 1:
        if not getattr(config, "base_model_tp_plan", None):
            raise UnshardableModel(f"{name} has no tensor-parallel plan in transformers: use tp=1")
        for attr in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(config, attr, None)
            if value is not None and value % tp:
                raise UnshardableModel(f"tp={tp} does not divide {attr}={value} of {name}: pick a divisor of it")
    if pp > 1:
        if not getattr(config, "base_model_pp_plan", None):
            raise UnshardableModel(f"{name} has no pipeline-parallel plan in transformers: use pp=1")
        layers = getattr(config, "num_hidden_layers", 0)
        if pp > layers:
            raise UnshardableModel(f"pp={pp} exceeds the {layers} layers of {name}: use pp <= {layers}")


def layer_range(stage: int, pp: int, layers: int) -> tuple[int, int]:
    """Layers ``[start, end)`` of ``stage``, as transformers splits them."""
    per = layers // pp
    start = stage * per
    return start, layers if stage == pp - 1 else start + per


@contextlib.contextmanager
def _adjusted(topo: Topology):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed import mixin, utils

    kind = topo.device.type
    dense = init_device_mesh(kind, (topo.dp, topo.pp, 1, 1, topo.tp),
                             mesh_dim_names=("dp", "pp", "dp_replicate", "fsdp", "tp"))
    expert = init_device_mesh(kind, (topo.dp, topo.pp, 1, topo.tp, 1),
                              mesh_dim_names=("dp", "pp", "dp_replicate", "efsdp", "ep"))
    meshes = utils.TransformersDeviceMesh(dense["pp", "dp_replicate", "fsdp", "tp"],
                                          expert["pp", "dp_replicate", "efsdp", "ep"])

    def replica_mesh(config: Any):
        return utils._bind_local_device(kind, topo.local_rank), meshes

    original_apply = mixin.apply_tensor_parallelism

    def apply_existing(model: torch.nn.Module, mesh: Any, plan: dict[str, str]):
        names = {n for n, m in model.named_modules() if type(m).__name__ != "PipelineIdentityLayer"}
        names |= {n for n, _ in model.named_parameters()}
        return original_apply(model, mesh, {k: v for k, v in plan.items() if k in names})

    saved = mixin.initialize_distributed_mesh, mixin.apply_tensor_parallelism
    mixin.initialize_distributed_mesh, mixin.apply_tensor_parallelism = replica_mesh, apply_existing
    try:
        yield
    finally:
        mixin.initialize_distributed_mesh, mixin.apply_tensor_parallelism = saved


def load(path: str, topo: Topology, **kwargs: Any) -> torch.nn.Module:
    """This rank's part of the checkpoint at ``path``, sharded ``topo.pp × topo.tp``."""
    return load_split(path, topo, topo.tp, **kwargs)


def load_split(path: str, topo: Topology, tp: int, **kwargs: Any) -> torch.nn.Module:
    """This rank's part of the checkpoint at ``path``: its stage of ``topo.pp``, sharded
    ``tp`` ways by transformers (``tp=1``: whole, for an engine that applies its own
    tensor parallelism)."""
    import transformers
    from transformers.distributed import DistributedConfig

    config = transformers.AutoConfig.from_pretrained(path)
    check(config, tp, topo.pp)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if topo.rank != 0:
        transformers.utils.logging.disable_progress_bar()  # one progress bar per job, not per rank
    try:
        with _adjusted(topo):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, distributed_config=DistributedConfig(tp_size=tp, pp_size=topo.pp), **kwargs
            )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if topo.pp > 1:
        _own_pipeline(model, topo)
    if tp > 1:
        modules = dict(model.named_modules())
        for name in plan_styles(model):
            modules[name].forward = positional_input(modules[name].forward)
    return model


class StagePlaceholder(torch.nn.Module):
    """The embedding of a stage that does not own it: zeros of the right shape and dtype,
    so the stage's forward builds its masks and positions as the first stage does."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden = hidden
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.hidden, dtype=self.dtype, device=input_ids.device)


class LayerPlaceholder(torch.nn.Module):
    """A decoder layer owned by another stage. It holds the layer's submodules, weightless on
    the meta device, so the module tree (and every path a user can write) is the same on
    every rank; its forward passes the hidden states through. ``source_forward`` is the
    layer's real forward, whose operations its ``.source`` lists (as on the owner stage)."""

    def __init__(self, skeleton: torch.nn.Module) -> None:
        super().__init__()
        for module in skeleton.modules():
            # No parameters at all: transformers reads the model's device and dtype off
            # its first parameter, which must not be a placeholder's.
            module._parameters.clear()
            module._buffers.clear()
        for name, child in skeleton.named_children():
            self.add_module(name, child)
        self.source_forward = type(skeleton).forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else next(iter(kwargs.values()))


def _skeleton(template: torch.nn.Module, config: Any, index: int) -> torch.nn.Module:
    with torch.device("meta"):
        try:
            return type(template)(config, index)
        except TypeError:
            import copy

            return copy.deepcopy(template).to("meta")


def _own_pipeline(model: torch.nn.Module, topo: Topology) -> None:
    # transformers' naive pipeline forward blocks in its own p2p calls; our blocking points
    # go over the router instead (attach_pipeline), so the plain forward runs on every stage.
    model.__dict__.pop("forward", None)
    base = getattr(model, model.base_model_prefix)
    if topo.pp_rank > 0 and type(base.embed_tokens).__name__ == "PipelineIdentityLayer":
        base.embed_tokens = StagePlaceholder(model.config.hidden_size, model.dtype)
    start, end = layer_range(topo.pp_rank, topo.pp, len(base.layers))
    template = base.layers[start]
    for i in range(len(base.layers)):
        if not start <= i < end:
            base.layers[i] = LayerPlaceholder(_skeleton(template, model.config, i))


def plan_styles(model: torch.nn.Module) -> dict[str, str]:
    """The style name transformers' plan (``tp_plan``, ``*`` standing for a layer index)
    gives each module it names."""
    plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()]
    found = {}
    for name, _ in model.named_modules():
        style = next((v for rx, v in patterns if rx.match(name)), None)
        if style is not None:
            found[name] = style
    return found


def placements(model: torch.nn.Module, topo: Topology, root: str = "model",
               styles: Optional[dict[str, str]] = None) -> dict[str, Placement]:
    """The placement of every module of ``model`` (paths prefixed with ``root``); ``styles``:
    the tensor-parallel style name (of :data:`.styles.STYLES`) of each module another engine
    parallelized along transformers' layer split (default: transformers' plan)."""
    config = model.config
    prefix = model.base_model_prefix
    layers = config.num_hidden_layers
    last = topo.pp - 1

    def owner(name: str) -> Optional[int]:
        if topo.pp == 1:
            return 0
        if name == prefix or name == "":
            return None if name == "" else last
        m = re.match(rf"^{re.escape(prefix)}\.layers\.(\d+)(\.|$)", name)
        if m:
            i = int(m.group(1))
            return next(s for s in range(topo.pp) if layer_range(s, topo.pp, layers)[0] <= i < layer_range(s, topo.pp, layers)[1])
        if name.startswith(f"{prefix}.embed_tokens"):
            return 0
        if name.startswith(f"{prefix}.norm") or name.startswith("lm_head"):
            return last
        if name == f"{prefix}.layers":
            return last
        return None

    if styles is None:
        styles = plan_styles(model) if topo.tp > 1 else {}
    between = between_parallel_layers(model, styles)
    attention = {**attention_outputs(model, styles), **model_outputs(model, styles)}
    table = {}
    for name, _ in model.named_modules():
        stage = owner(name)
        inp, out = between.get(name) or STYLES.get(styles.get(name), (WHOLE, WHOLE))
        out = attention.get(name, out)
        stages = range(topo.pp) if stage is None else [stage]
        ranks = tuple(topo.rank_of(s, t) for s in stages for t in range(topo.tp))
        path = f"{root}.{name}" if name else root
        # Run on every stage inside the base model (the rotary embedding): later stages hand
        # it the embedding placeholder's zeros.
        stand_in = topo.pp > 1 and stage is None and name != ""
        table[path] = Placement(path, stage, ranks, inp, out, stand_in_input=stand_in)
    if topo.pp > 1:
        # The base model's input is the same on every stage; its output is the last stage's.
        base = f"{root}.{prefix}"
        p = table[base]
        table[base] = Placement(base, last, p.ranks, WHOLE, p.output)
    return table


def opaque_types(topo: Topology) -> tuple[type, ...]:
    """Objects holding tensor-parallel fragments wherever they appear in a value: at tp > 1
    the key/value cache holds the key and value states of this rank's heads (the plan's
    column-parallel ``k_proj``/``v_proj``), in a structure no codec assembles."""
    if topo.tp == 1:
        return ()
    from transformers.cache_utils import Cache

    return (Cache,)


def attach_pipeline(model: torch.nn.Module, topo: Topology, interleaver: Any, router: Any, root: str = "model") -> None:
    """Put the engine's stage-to-stage transfers on the router, as router-aware waits.

    They are *engine* waits (:meth:`..distributed.failure.Failures.wait`): after a failure
    every rank still runs its model call to the end, sending and receiving these messages,
    so a failed trace leaves no stream, and no collective of the engine, mismatched. The
    locations they send (the last layer's output of a stage, ``lm_head``'s) are the
    router's :attr:`~..distributed.router.Router.carried` ones: a value served there rides
    on these messages."""
    if topo.pp == 1:
        return
    prefix = model.base_model_prefix
    start, end = layer_range(topo.pp_rank, topo.pp, model.config.num_hidden_layers)
    points = interleaver.points
    stage, last = topo.pp_rank, topo.pp - 1
    prev_rank = topo.rank_of(stage - 1, topo.tp_rank) if stage > 0 else None
    next_rank = topo.rank_of(stage + 1, topo.tp_rank) if stage < last else None

    if stage > 0:
        def receive_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = router.wait(("h", interleaver.step), "hidden states", prev_rank, engine=True)
            if args:
                return (hidden.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        points[f"{root}.{prefix}.layers.{start}"].before = receive_hidden

    boundary, logits_at = f"{root}.{prefix}.layers.{end - 1}.output", f"{root}.lm_head.output"
    if stage < last:
        router.carried.add(boundary)

        def send_hidden(out: Any) -> Any:
            router.send(next_rank, ("h", interleaver.step), out, boundary)
            return out

        def receive_logits(out: Any) -> Any:
            if router.stage_local:
                return out  # nobody reads them: this stage goes on to its next trace
            logits = router.wait(("logits", interleaver.step), "logits", topo.rank_of(last, topo.tp_rank), engine=True)
            return logits.to(out.device)

        points[f"{root}.{prefix}.layers.{end - 1}"].after = send_hidden
        points[f"{root}.lm_head"].after = receive_logits
    else:
        router.carried.add(logits_at)

        def send_logits(out: Any) -> Any:
            if router.stage_local:
                return out
            router.broadcast(("logits", interleaver.step), out, location=logits_at)
            return out

        points[f"{root}.lm_head"].after = send_logits


def meta_model(config: Any, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device: its module tree and its plans
    (``tp_plan``, layer split), no weights, nothing allocated, no process group."""
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def _recorded_shards(found: list):
    # Each style's ``shard_param`` decides a parameter's placement and hands it to
    # ``distribute_tensor``; recording that call reads the decision without a mesh.
    from transformers.distributed import tensor_parallel

    def record(tensor: torch.Tensor, mesh: Any, placements: Any, **kwargs: Any) -> torch.Tensor:
        found.append(placements[0])
        return tensor

    saved = tensor_parallel.distribute_tensor
    tensor_parallel.distribute_tensor = record
    try:
        yield
    finally:
        tensor_parallel.distribute_tensor = saved


def parameter_shards(model: torch.nn.Module, topo: Topology) -> dict[str, tuple[int, ...]]:
    """Each parameter's element count on tensor-parallel rank ``0..tp-1``, as transformers
    shards it: its plan expanded to parameters, each style's own ``shard_param`` choosing
    the placement (a ``Shard(d)`` splits dimension ``d`` as DTensor does, the last rank
    holding the shorter slice; anything else is replicated). ``model`` is a meta model
    (:func:`meta_model`); tied parameters are listed under every name."""
    from torch.distributed.tensor import Shard
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    styles = model._expand_parallel_plan(dict(model.tp_plan)) if topo.tp > 1 else {}
    modules = dict(model.named_modules())
    counts = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        whole = param.numel()
        counts[name] = (whole,) * topo.tp
        if name not in styles:
            continue
        module_name, _, param_name = name.rpartition(".")
        found: list = []
        with _recorded_shards(found):
            ALL_PARALLEL_STYLES[styles[name]].shard_param(modules[module_name], param_name, None)
        if found and isinstance(found[0], Shard):
            size = param.shape[found[0].dim % param.dim()]
            counts[name] = tuple(whole // size * Shard.local_shard_size_and_offset(size, topo.tp, t)[0]
                                 for t in range(topo.tp))
    return counts
