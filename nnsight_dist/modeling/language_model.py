"""``nd.LanguageModel`` / ``nd.TransformersModel``: a causal LM from transformers, with its tokenizer.

Loads a local checkpoint (or wraps an already-built model), prepares prompts given as a
string, a list of strings, token ids or a tokenizer output, and batches the prompts of
several invokes as nnsight does: every row keeps its own tokens, and rows are padded on
the tokenizer's padding side (left by default) to the longest row of the batch.
``generate`` traces ``model.generate``; every generation step is one step of the trace,
and the ids pass through ``model.generator`` (see :mod:`.generator`).

``TransformersModel(path, task="text-generation")`` is nnsight 0.8.1's newer name for the
same model (nnsight deprecates ``LanguageModel`` for it; here both are primary names and
neither warns). Only the text-generation task exists here; other transformers pipeline
tasks are refused.

Loading keywords follow nnsight: ``dispatch`` (nnsight builds the model on the meta device
and loads the weights at the first trace unless ``dispatch=True``; here the weights are
always loaded at construction, so both values are accepted and ``model.dispatched`` is
always true), ``tokenizer_kwargs`` (attributes set on the tokenizer), ``envoys``,
``rename``, and the keywords of ``from_pretrained`` (``device_map``, ``revision``,
``attn_implementation``, ``trust_remote_code``...).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch

from .. import engines
from ..intervention.envoy import Envoy, EnvoyClasses, Rename
from ..intervention.save import add_save_method
from ..tracing.tracer import InterleavingTracer
from .generator import Generator, GeneratorEnvoy
from .nnsight import Batched, NNsight

Prompt = Union[str, list, torch.Tensor, dict]
TASKS = ("text-generation",)
#: ``from_pretrained`` keywords that concern the tokenizer's files as much as the weights.
_TOKENIZER_LOAD_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")


class TransformersModel(NNsight):
    """A traceable causal LM for transformers' ``task`` (see the module docstring)."""

    def __init__(
        self,
        path_or_model: Any,
        *,
        task: Optional[str] = "text-generation",
        tp: int = 1,
        pp: int = 1,
        engine: str = "transformers",
        dtype: Any = None,
        device: Any = None,
        tokenizer: Any = None,
        tokenizer_kwargs: Optional[dict] = None,
        rename: Optional[Rename] = None,
        envoys: Optional[EnvoyClasses] = None,
        dispatch: bool = False,
        peft: Optional[str] = None,
        **load_kwargs: Any,
    ) -> None:
        import transformers

        if peft is not None:
            raise NotImplementedError("PEFT adapters (nnsight's peft=) are not supported: merge the adapter first")

        add_save_method(transformers.utils.ModelOutput)
        from ..distributed import topology

        _check_task(task)
        engine_impl = engines.get(engine)
        topo = topology.init(tp=tp, pp=pp)
        distributed = topo.distributed
        if distributed:
            if isinstance(path_or_model, torch.nn.Module):
                raise ValueError("a distributed LanguageModel loads its own part of a checkpoint: pass a path")
            source = str(path_or_model)
            if dtype is not None:
                load_kwargs["dtype"] = dtype
            module = engine_impl.load(source, topo, **load_kwargs)
        elif isinstance(path_or_model, torch.nn.Module):
            module = path_or_model
            source = getattr(module.config, "_name_or_path", None)
        else:
            source = str(path_or_model)
            if dtype is not None:
                load_kwargs["dtype"] = dtype
            module = transformers.AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        if device is not None:
            module = module.to(device)
        module.eval()
        if tokenizer is None and source:
            shared = {k: load_kwargs[k] for k in _TOKENIZER_LOAD_KWARGS if k in load_kwargs}
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, padding_side="left", **shared)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for key, value in (tokenizer_kwargs or {}).items():
            setattr(tokenizer, key, value)
        super().__init__(module, rename=rename, envoys=envoys)
        self.__dict__["task"] = task or TASKS[0]
        self.__dict__["dispatched"] = True
        self.__dict__["tokenizer"] = tokenizer
        self.__dict__["topology"] = topo
        self.__dict__["generator"] = GeneratorEnvoy(Generator(), self.interleaver, f"{self.path}.generator")
        for key in ("input", "output"):  # the streamer sees the prompt, then each step
            self.interleaver.sites[f"{self.path}.generator.streamer.{key}"].extra = 1
        if distributed:
            from ..distributed.replica import ReplicaSeam

            table = engine_impl.placements(module, topo, self.path)
            seam = ReplicaSeam(topo, table, self.interleaver, engine_impl.opaque_types(topo),
                               engine_impl.backward_refused)
            self.interleaver.seam = seam
            engine_impl.attach_pipeline(module, topo, self.interleaver, seam.router, self.path)
            self.__dict__["_placements"] = table
        else:
            self.__dict__["_placements"] = None

    def dispatch(self) -> None:
        """nnsight's explicit weight loading; the weights here are loaded at construction."""

    def placements(self) -> dict:
        """Every module's placement: owner stage, ranks, input and output placement."""
        from ..distributed.placement import Placement

        if self._placements is None:
            return {path: Placement(path, 0, (0,)) for path, _ in self.named_modules()}
        return dict(self._placements)

    def placement(self, path: Any):
        """The placement of the module at ``path`` (full, ``"model.model.layers.0"``, or
        relative) or of an envoy; :class:`ModulePathError` naming where the path breaks."""
        if isinstance(path, Envoy):
            path = path.path
        if not isinstance(path, str):
            raise TypeError(f"placement takes a module path (\"model.layers.0\") or an envoy, not {type(path).__name__}")
        table = self.placements()
        for candidate in (path, f"{self.path}.{path}"):
            if candidate in table:
                return table[candidate]
        # Read as a full path and as a relative one (the root's name, "model", is often its
        # child's too): the error is raised where the reading that goes deeper breaks.
        readings = list(dict.fromkeys((path.removeprefix(self.path + "."), path)))
        self.get(max(readings, key=self._resolved))  # raises ModulePathError with near names
        raise KeyError(path)

    def _resolved(self, path: str) -> int:
        """How many leading components of the relative ``path`` name modules."""
        envoy, n = self, 0
        for part in [p for p in path.split(".") if p]:
            try:
                envoy = envoy.get(part)
            except AttributeError:
                break
            if not isinstance(envoy, Envoy):
                break
            n += 1
        return n

    @property
    def config(self) -> Any:
        return self._module.config

    def trace(self, *inputs: Any, **kwargs: Any) -> InterleavingTracer:
        """A tracer running the model once on ``inputs`` (or ``input_ids=...`` keywords)."""
        inputs, kwargs = _keyword_prompt(inputs, kwargs)
        return InterleavingTracer(self, self._forward, inputs, kwargs)

    def generate(self, *inputs: Any, **kwargs: Any) -> InterleavingTracer:
        """A tracer around ``model.generate``; each new token is one step (``tracer.iter``)."""
        inputs, kwargs = _keyword_prompt(inputs, kwargs)
        steps = kwargs.get("max_new_tokens")
        return InterleavingTracer(self, self._generate, inputs, kwargs, steps=steps)

    # ------------------------------------------------------------------ inputs

    def _rows(self, args: tuple, kwargs: dict) -> list[list[int]]:
        """The token rows of one input, without padding."""
        if len(args) != 1:
            raise TypeError(f"a LanguageModel input is one prompt or batch of prompts, got {len(args)} arguments")
        prompt = args[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            if self.tokenizer is None:
                raise ValueError("this LanguageModel has no tokenizer: pass token ids instead of text")
            enc = self.tokenizer([prompt] if isinstance(prompt, str) else prompt)
            return [list(ids) for ids in enc["input_ids"]]
        if isinstance(prompt, dict) or hasattr(prompt, "keys"):
            ids = prompt["input_ids"]
            mask = prompt.get("attention_mask")
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            if ids and isinstance(ids[0], int):
                ids = [ids]
            if mask is None:
                return [list(r) for r in ids]
            mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
            mask = [mask] if mask and isinstance(mask[0], int) else mask
            return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return [prompt]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            return prompt
        raise TypeError(
            f"cannot use {type(prompt).__name__} as a prompt: give a string, a list of strings, "
            "token ids (list or tensor) or a tokenizer output"
        )

    def _batch(self, inputs: list[tuple[tuple, dict]]) -> Batched:
        rows: list[list[int]] = []
        groups: list[Optional[tuple[int, int]]] = []
        for args, kwargs in inputs:
            args, kwargs = _keyword_prompt(args, kwargs)
            if not args:
                groups.append(None)
                continue
            mine = self._rows(args, kwargs)
            groups.append((len(rows), len(mine)))
            rows.extend(mine)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        left = self.tokenizer is None or self.tokenizer.padding_side == "left"
        ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        device = self._module.device
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        return (), batch, groups, len(rows)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if "position_ids" not in kwargs and "attention_mask" in kwargs:
            # As generate does: padded rows count positions from their first real token.
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self._placements is not None and not self.interleaver.calls_backward:
            # Sharded runs are inference unless the body calls backward: the engines' local
            # fast paths, no autograd views forbidding in-place edits of their outputs.
            with torch.no_grad():
                return self._module(*args, **kwargs)
        return self._module(*args, **kwargs)

    def _generate(self, args: tuple, kwargs: dict) -> Any:
        if self.tokenizer is not None and "pad_token_id" not in kwargs:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        # As nnsight: our streamer unless the caller brings one, or beam search (which
        # transformers refuses any streamer for) is on.
        config = kwargs.get("generation_config") or getattr(self._module, "generation_config", None)
        if (kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1) == 1:
            kwargs.setdefault("streamer", self.generator.streamer._module)
        return self.generator._module(self._module.generate(*args, **kwargs))


class LanguageModel(TransformersModel):
    """A traceable causal LM: :class:`TransformersModel` for the text-generation task."""

    def __init__(self, path_or_model: Any, **kwargs: Any) -> None:
        kwargs.setdefault("task", "text-generation")
        super().__init__(path_or_model, **kwargs)


def _check_task(task: Optional[str]) -> None:
    """Refuse a task other than text-generation: ``KeyError`` for one transformers does not
    know (as nnsight), ``NotImplementedError`` for one it knows."""
    if task is None or task in TASKS:
        return
    from transformers.pipelines import check_task

    check_task(task)  # KeyError: "Unknown task ..., available tasks are [...]"
    raise NotImplementedError(
        f"task {task!r} is not supported by nnsight_dist: only {', '.join(map(repr, TASKS))} "
        "(a causal language model, AutoModelForCausalLM) is"
    )


def _keyword_prompt(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``input_ids=``/``attention_mask=`` keywords as one tokenizer-dict prompt."""
    if args or "input_ids" not in kwargs:
        return args, kwargs
    kwargs = dict(kwargs)
    prompt = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask") if k in kwargs}
    return (prompt,), kwargs
