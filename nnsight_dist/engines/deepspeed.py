"""The DeepSpeed engine: DeepSpeed's automatic tensor parallelism (AutoTP), described for nnsight_dist.

Each rank loads the checkpoint with transformers and hands it to ``deepspeed.init_inference``
with ``tensor_parallel={"tp_size", "tp_group", "mpu"}``, our tensor-parallel group: AutoTP
swaps the model's linear layers for its own classes and keeps this rank's slice of their
weights as plain tensors. Tensor parallelism only (``pp`` must be 1); ``dp`` replicas each
form their own group.

Two adjustments make it fit:

- DeepSpeed reads its tensor-parallel group from ``mpu`` (``tp_group`` alone is replaced by
  a group of the first ``tp`` ranks of the world, wrong for every replica but the first);
- its CPU all-reduce kernel (``deepspeed_shm_comm``, compiled with g++ on first use)
  reduces over the whole world whatever the group (a ``dp`` replica would sum the other
  replica's values in), needs ``LOCAL_SIZE`` equal to the world size or it crashes, waits
  on shared memory with no timeout, and leaves its shared-memory files behind: it is never
  built, and DeepSpeed's all-reduces go through ``torch.distributed`` on our group.

The engine only *describes*: :func:`placements` maps DeepSpeed's module classes to
tensor-parallel styles (:mod:`.styles`) and reads each sliced parameter's split from the
metadata DeepSpeed records on it. Uneven splits (DeepSpeed cuts MLP and ``lm_head``
dimensions in blocks of ``tp_grain_size``, 64) are refused: a gathered fragment must be one
of equal slices.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, NamedTuple, Optional

import torch

from ..distributed.placement import LOCAL, WHOLE, Placement, shard
from ..distributed.topology import Topology
from ..intervention.errors import UnshardableModel
from .styles import STYLES, attention_outputs, between_parallel_layers, model_outputs, undescribed_ancestors
from .transformers import meta_model
from .transformers import opaque_types  # noqa: F401 - the same cache: this rank's heads

name = "deepspeed"
#: Verified against DeepSpeed's ``LmHeadLinearAllreduce.forward``.
backward_refused = (
    "DeepSpeed's lm_head (LmHeadLinearAllreduce) multiplies this rank's slice of the hidden states and "
    "all-reduces the product outside autograd, so the hidden states' gradient would hold this rank's slice "
    "only. Trace with engine='transformers' to call backward"
)

#: The style of each DeepSpeed class whose layout is known (exact classes: a subclass may
#: cut its weights differently). ``LmHeadLinearAllreduce`` and
#: ``LinearAllreduceWithReplicatedInput`` slice their whole input themselves, then reduce.
_CLASS_STYLES = {
    "LinearLayer": "colwise",
    "LinearAllreduce": "rowwise",
    "LmHeadLinearAllreduce": "rowwise_split_input",
    "LinearAllreduceWithReplicatedInput": "rowwise_split_input",
}


def check(config: Any, tp: int, pp: int) -> None:
    """Raise :class:`UnshardableModel` before loading when ``tp``/``pp`` cannot split the model:
    ``pp > 1`` (AutoTP is tensor parallelism only), a ``tp`` that does not divide the heads,
    a model AutoTP does not support, or a dimension DeepSpeed would split into unequal
    slices."""
    cls = type(config).__name__
    if pp > 1:
        raise UnshardableModel(f"the deepspeed engine is tensor-parallel only (AutoTP): use pp=1, or "
                               f"engine='transformers' to split {cls} into pipeline stages")
    if tp == 1:
        return
    for attr in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, attr, None)
        if value is not None and value % tp:
            raise UnshardableModel(f"tp={tp} does not divide {attr}={value} of {cls}: pick a divisor of it")
    _require_deepspeed()
    from deepspeed.inference.config import DeepSpeedTPConfig
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    try:  # AutoTP asks the model's printed form (a meta model: no weights, nothing allocated)
        supported = AutoTP.supported(meta_model(config))
    except AssertionError:
        supported = False
    if not supported:
        raise UnshardableModel(f"DeepSpeed's AutoTP does not shard {cls}: use engine='transformers', or tp=1")

    grain = DeepSpeedTPConfig().tp_grain_size
    meta = AutoTPMeta.from_model_config(config, grain)
    # The names select DeepSpeed's rule: MLP layers and lm_head are cut in blocks of ``grain``.
    for attr, layer in (("intermediate_size", "mlp"), ("hidden_size", "lm_head")):
        value = getattr(config, attr, None)
        if value is None:
            continue
        sizes = get_shard_size_list(value, tp, meta, layer)
        if len(set(sizes)) > 1:
            raise UnshardableModel(
                f"DeepSpeed splits {attr}={value} of {cls} into unequal slices {sizes} at tp={tp} (blocks of "
                f"{grain}): use a tp for which {attr} is a multiple of {grain} x tp"
            )


def _require_deepspeed() -> None:
    try:
        # DeepSpeed's logger binds itself to the stdout of its first import: its notes
        # (the accelerator it picked) go to stderr, the user's stdout stays the user's.
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    except ImportError as error:
        raise ImportError("engine='deepspeed' needs DeepSpeed: pip install 'nnsight_dist[deepspeed]'") from error


class _ReplicaGroup:
    """DeepSpeed's ``mpu``: this rank's tensor-parallel group, as our topology made it."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_model_parallel_group(self) -> Any:
        return self.topo.group("tp")

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank


def _start_communication() -> None:
    """DeepSpeed's communication backend over the process group we started, with its
    all-reduces on ``torch.distributed`` (see the module docstring)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.comm import comm

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if comm.cdb is None:
        deepspeed.init_distributed()
    elif getattr(comm.cdb, "shm_comm_op", None) is not None:
        comm.cdb.shm_vector_kernel_level = 0  # a backend started earlier, with the kernel
    # DeepSpeed takes the kernel when its op is registered and the backend's level allows it.
    if hasattr(torch.ops.deepspeed, "inference_all_reduce_") and getattr(comm.cdb, "shm_vector_kernel_level", 0):
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} still uses its shared-memory all-reduce kernel, which reduces over "
            "the whole world whatever the group: the deepspeed engine does not know how to turn it off in this "
            "version (written for 0.19.8)"
        )


def load(path: str, topo: Topology, **kwargs: Any) -> torch.nn.Module:
    """This rank's part of the checkpoint at ``path``: the whole model loaded, then sliced by
    AutoTP over this replica's tensor-parallel group."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    check(config, topo.tp, topo.pp)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if topo.rank != 0:
        transformers.utils.logging.disable_progress_bar()  # one progress bar per job, not per rank
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if topo.tp == 1:
        return model
    import deepspeed

    _start_communication()
    tensor_parallel = {"tp_size": topo.tp, "tp_group": topo.group("tp"), "mpu": _ReplicaGroup(topo)}
    # AutoTP prints the layers it swaps; the user's stdout is the user's.
    with contextlib.redirect_stdout(sys.stderr):
        engine = deepspeed.init_inference(model, tensor_parallel=tensor_parallel, dtype=model.dtype)
    model = engine.module
    for layer_name, module in _parallel_layers(model).items():
        for pname, param in module.named_parameters(recurse=False):
            split = _split(param)
            if _style(module) is None or (split is not None and split.replicated):
                continue  # undescribed layers are refused, whatever their split
            if split is None:
                raise RuntimeError(
                    f"DeepSpeed {deepspeed.__version__} no longer records how it split {layer_name}.{pname} "
                    "(ds_autotp_universal_checkpoint_meta): the deepspeed engine was written for 0.19.8"
                )
            if len(set(split.sizes)) > 1:
                raise UnshardableModel(f"DeepSpeed split {layer_name}.{pname} into unequal slices {list(split.sizes)}: "
                                       "choose a tp that divides its dimensions in blocks of 64")
        if type(module).__name__ == "LmHeadLinearAllreduce":
            module.forward = _any_leading_dims(module.forward)
    return model


def _any_leading_dims(forward: Any) -> Any:
    """``forward`` of DeepSpeed's lm_head taking what the ``nn.Linear`` it replaced takes.

    It slices its input as ``input[:, :, columns]``, three dimensions only; an ad-hoc call
    on the last token's hidden states (``lm_head(h[:, -1])``, the logit lens) is 2-D. Other
    shapes go through it as one row of a batch, and come back in their own shape."""
    @functools.wraps(forward)
    def any_leading_dims(input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 3:
            return forward(input)
        return forward(input.reshape(1, -1, input.shape[-1])).reshape(*input.shape[:-1], -1)
    return any_leading_dims


def _parallel_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules AutoTP swapped in (its ``TensorParallel_Layer`` classes), by name."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorParallel_Layer)}


def _style(module: torch.nn.Module) -> Optional[str]:
    """The style of a swapped layer of known layout; ``None`` for another class."""
    style = _CLASS_STYLES.get(type(module).__name__) if type(module).__module__.startswith("deepspeed.") else None
    if style == "colwise" and getattr(module, "gather_output", False):
        return "colwise_gather_output"
    return style


class _Split(NamedTuple):
    """How DeepSpeed split one parameter of a swapped layer, as it records it on the
    parameter (``ds_autotp_universal_checkpoint_meta``)."""

    replicated: bool
    dim: Optional[int]
    sizes: tuple[int, ...]
    #: Cut sub-parameter by sub-parameter (a fused weight): no one dimension joins the slices.
    fused: bool


def _split(param: torch.Tensor) -> Optional[_Split]:
    """The split DeepSpeed records on ``param``; ``None`` without a record."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    meta = getattr(param, DS_AUTOTP_UC_META, None)
    if meta is None:
        return None
    return _Split(bool(meta.get("replicated")), meta.get("partition_dim"), tuple(meta.get("partition_sizes") or ()),
                  bool(meta.get("sub_param_shard_widths")))


def _parameters(module: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """The placement of each sliced parameter of a swapped layer (:func:`_split`): ``shard(d)``
    for equal slices along ``d``; ``local`` for any other layout (a fused weight, a parameter
    without a record). Replicated parameters are whole and not listed."""
    found = []
    for pname, param in module.named_parameters(recurse=False):
        split = _split(param)
        if split is not None and split.replicated:
            continue
        even = split is not None and split.dim is not None and len(set(split.sizes)) == 1 and not split.fused
        found.append((pname, shard(split.dim) if even else LOCAL))
    return tuple(found)


def placements(model: torch.nn.Module, topo: Topology, root: str = "model") -> dict[str, Placement]:
    """The placement of every module of ``model`` (paths prefixed with ``root``): swapped
    layers by their class (:data:`_CLASS_STYLES`); a swapped layer of another class, and the
    modules beside it, ``local`` (they may compute on fragments of a layout not described
    here); the others as :mod:`.styles` derives them."""
    swapped = _parallel_layers(model) if topo.tp > 1 else {}
    styles = {n: _style(m) for n, m in swapped.items()}
    unknown = {n for n, s in styles.items() if s is None}
    beside = {f"{parent}.{kid}" if parent else kid
              for parent in {n.rpartition(".")[0] for n in unknown}
              for kid, _ in model.get_submodule(parent).named_children()}
    between = between_parallel_layers(model, styles)
    attention = {**undescribed_ancestors(model, unknown), **attention_outputs(model, styles),
                 **model_outputs(model, styles)}
    ranks = tuple(topo.rank_of(0, t) for t in range(topo.tp))
    table = {}
    for name, _ in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in beside) and styles.get(name) is None:
            inp = out = LOCAL
        else:
            inp, out = between.get(name) or STYLES.get(styles.get(name), (WHOLE, WHOLE))
            out = attention.get(name, out)
        path = f"{root}.{name}" if name else root
        params = _parameters(swapped[name]) if name in swapped else ()
        table[path] = Placement(path, 0, ranks, inp, out, params)
    return table


def attach_pipeline(model: torch.nn.Module, topo: Topology, interleaver: Any, router: Any, root: str = "model") -> None:
    """Nothing: the engine has one stage."""
