"""``nd.collect_activations``: a sharded model's activations, streamed to an activation store.

Collection is a trace per batch whose body only observes. Each data-parallel replica takes
its contiguous share of the documents (:func:`.data.split_for_replica`); each rank records
only what it writes (:mod:`.plan`): its stage's entries, its tensor-parallel shard as the
engine holds it (or the whole value, assembled in one collective at the end of the trace,
once per tensor-parallel group). Rows are the real tokens only: padding is dropped inside
the observer, before anything is copied. A background writer (:mod:`.writer`) puts chunks
on disk while the model runs on.

Resuming: a chunk is a fixed run of batches, so its bytes depend only on the model, the
data and the options. Before any work the ranks agree on the chunks every rank of a
replica has complete; those are skipped, the rest are computed and written again. The
first rank checks the store's ``run.json`` (what an earlier collection in the same
directory was asked to do) and every rank raises the same error when the model, the data,
the entries, the options or the layout differ. The manifest is written last, by rank 0
from every rank's records (:mod:`.manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from typing import Any, Optional

import torch

from ..distributed.exchange import broadcast_object, gather_object
from ..distributed.placement import _first_value
from ..intervention.errors import RemoteError
from .data import Documents, replica_range
from .format import (FORMAT, MANIFEST, RUN, STATS, TOKENS, VERSION, StoreError, chunk_name, complete, dtype_name,
                     read_json, write_json)
from .manifest import finish
from .plan import Entry, resolve
from .writer import ChunkWriter


def collect_activations(model: Any, data: Any, modules: Any, out_dir: str, *, batch_size: int = 8,
                        max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                        include_inputs: bool = False, gather_tp: bool = False, resume: bool = True,
                        progress: bool = True, chunk_batches: int = 16, pipelined: Optional[bool] = None) -> Any:
    """Run ``model`` over ``data`` and write the chosen modules' activations to ``out_dir``.

    A collective: every rank of the job calls it with the same arguments. ``data`` is a list
    of strings, a ``.txt`` (a document per line) or ``.jsonl`` (a ``text`` field) file, or a
    ``datasets`` column; ``modules`` paths or glob patterns relative to the model
    (``"model.layers.*.mlp"``). Documents are tokenized with the model's tokenizer, cut to
    ``max_length`` tokens; ``batch_size`` documents make one trace, ``chunk_batches`` batches
    one chunk. Values are stored in ``dtype`` (default: as the model computes them).
    ``include_inputs`` also stores each module's first input (``<path>.input``).
    ``gather_tp`` stores tensor-parallel shards whole (once per tensor-parallel group).
    With ``resume`` complete chunks of an interrupted run are kept; without it the
    directory's earlier store is removed first. Rank 0 shows a progress bar unless
    ``progress`` is false. Under pipeline parallelism the stages work on different batches
    at once unless ``pipelined`` is false (stage-local traces: see
    :meth:`..distributed.replica.ReplicaSeam.stage_local`). Returns the
    :class:`~.reader.ActivationStore` on every rank.

    Errors in the arguments raise :class:`~.format.StoreError` on every rank before any
    work. An error while collecting (in a trace, or writing) ends the collection on every
    rank at the end of the chunk in progress, each rank raising its own error or a
    :class:`RemoteError` naming the first; complete chunks stay for a rerun to resume.
    """
    for name, value in (("batch_size", batch_size), ("chunk_batches", chunk_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StoreError(f"{name} must be a positive integer, got {value!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise StoreError(f"max_length must be a positive integer or None, got {max_length!r}")
    if model.tokenizer is None:
        raise StoreError("collect_activations tokenizes documents: the model has no tokenizer")
    topo = model.topology
    out_dir = os.path.abspath(os.fspath(out_dir))
    docs = Documents(data)
    entries = resolve(model, modules, include_inputs, gather_tp)
    run = _run_spec(model, docs, entries, batch_size, max_length, dtype, include_inputs, gather_tp, chunk_batches)
    _prepare(out_dir, run, resume, topo)

    share = replica_range(len(docs), topo.dp_rank, topo.dp)
    batches = [range(i, min(i + batch_size, share.stop)) for i in range(share.start, share.stop, batch_size)]
    chunks = [batches[i:i + chunk_batches] for i in range(0, len(batches), chunk_batches)]
    # Every rank passes the same chunk boundaries (where errors are exchanged), whatever its
    # replica's share: as many as the largest share has.
    largest = len(replica_range(len(docs), topo.dp - 1, topo.dp))
    boundaries = -(-largest // (batch_size * chunk_batches))
    mine = [e for e in entries if e.writes(topo.pp_rank, topo.tp_rank)]  # the others observe for gathers
    writes_tokens = topo.pp_rank == 0 and topo.tp_rank == 0

    def files(c: int) -> dict[str, str]:
        named = {e.name: chunk_name(e.name, topo.dp_rank, c, topo.tp_rank if e.sharded else 0) for e in mine}
        if writes_tokens:
            named[TOKENS] = chunk_name(TOKENS, topo.dp_rank, c)
        return named

    skip = _agree(out_dir, topo, [c for c in range(len(chunks)) if all(complete(out_dir, f) for f in files(c).values())])
    recorder = _Recorder(model, entries, {e.name for e in mine}, dtype)
    writer = ChunkWriter(out_dir)
    bar = _Bar(progress and topo.rank == 0, len(share), writer)
    seam = model.interleaver.seam
    staged = (topo.pp > 1 if pipelined is None else pipelined) and hasattr(seam, "stage_local")
    error: Optional[BaseException] = None
    try:
        with seam.stage_local() if staged else contextlib.nullcontext():
            for c in range(boundaries):
                chunk = chunks[c] if c < len(chunks) and c not in skip else []
                if c in skip:
                    bar.update(sum(len(b) for b in chunks[c]), 0)
                named = files(c)
                for batch in chunk:
                    try:
                        values, tokens = recorder.run(_tokenize(model, docs.read(batch), max_length), batch.start)
                        if error is None:
                            out = {named[name]: v for name, v in values.items()}
                            if writes_tokens:
                                out[named[TOKENS]] = tokens
                            writer.put(out)
                        bar.update(len(batch), int(tokens.shape[0]))
                    except Exception as e:  # the ranks go on in step to the chunk's end, then all raise
                        error = error or e
                        if getattr(e, "lost", False):
                            raise
                if error is None and chunk:
                    error = _attempt(writer.end_chunk)
                _raise_everywhere(topo, error)
            error = _attempt(writer.close)
            records = {name: complete(out_dir, name) for c in range(len(chunks)) for name in files(c).values()}
            missing = [n for n, r in records.items() if r is None]
            if error is None and missing:
                error = StoreError(f"rank {topo.rank}: chunk {missing[0]} was not written completely")
            _raise_everywhere(topo, error)
    except BaseException:
        writer.abandon()
        bar.close()
        raise
    bar.close()
    finish(out_dir, run, topo, entries, records, len(chunks))
    from .reader import ActivationStore

    return ActivationStore(out_dir)


# ---------------------------------------------------------------------- the run's identity


def _attempt(fn: Any) -> Optional[Exception]:
    """``fn()``'s exception, or ``None``."""
    try:
        fn()
    except Exception as e:
        return e
    return None


def _raise_everywhere(topo: Any, error: Optional[BaseException]) -> None:
    """Raise on every rank when any rank has an ``error`` (a collective over the job, once
    per chunk): each rank its own error, the others a :class:`RemoteError` naming it."""
    if not topo.distributed:
        if error is not None:
            raise error
        return
    said = None if error is None else {"rank": topo.rank, "type": type(error).__name__, "message": str(error)}
    everyone = gather_object(said, dst=0)
    first = next((s for s in everyone if s is not None), None) if topo.rank == 0 else None
    first = broadcast_object(first, 0)
    if error is not None:
        raise error
    if first is not None:
        raise RemoteError(first["rank"], f"{first['type']}: {first['message']} (the collection stopped on every rank; "
                          "complete chunks are kept: rerun to resume)")


def _run_spec(model: Any, docs: Documents, entries: list[Entry], batch_size: int, max_length: Optional[int],
              dtype: Optional[torch.dtype], include_inputs: bool, gather_tp: bool, chunk_batches: int) -> dict:
    topo = model.topology
    return {
        "format": FORMAT, "version": VERSION,
        "model": {"name": str(getattr(model.config, "_name_or_path", "") or type(model._module).__name__),
                  "root": model.path, "config_sha256": _model_fingerprint(model),
                  # how it computes: the same weights in another dtype give other values
                  "dtype": dtype_name(next((p.dtype for p in model._module.parameters()), torch.float32)),
                  "attention": str(getattr(model.config, "_attn_implementation", None))},
        "data": {"fingerprint": docs.fingerprint, "documents": len(docs)},
        "options": {"batch_size": batch_size, "max_length": max_length,
                    "dtype": None if dtype is None else dtype_name(dtype), "include_inputs": include_inputs,
                    "gather_tp": gather_tp, "chunk_batches": chunk_batches},
        "layout": {"world_size": topo.world_size, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp},
        "entries": {e.name: e.describe() for e in entries},
    }


def _model_fingerprint(model: Any) -> str:
    """sha256 of the model's configuration and a sample of its weights' bytes: the last MiB
    of each checkpoint file (reading 140 GB to name a model is not an option)."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    source = str(getattr(model.config, "_name_or_path", "") or "")
    weights = sorted(f for f in os.listdir(source) if f.endswith((".safetensors", ".bin"))) \
        if os.path.isdir(source) else []
    for name in weights:
        path = os.path.join(source, name)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            digest.update(f"{name}:{size}:".encode() + f.read())
    if not weights:
        for _, p in sorted(model._module.state_dict().items())[:4]:
            digest.update(p.detach().cpu().reshape(-1)[:4096].to(torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _prepare(out_dir: str, run: dict, resume: bool, topo: Any) -> None:
    """Check (rank 0) the directory against ``run``; every rank raises the same error."""
    verdict = ""
    if topo.rank == 0:
        try:
            verdict = _check_directory(out_dir, run, resume)
        except OSError as e:
            verdict = f"{out_dir} cannot be used for a store: {e}"
    verdict = broadcast_object(verdict, 0) if topo.distributed else verdict
    if verdict:
        raise StoreError(verdict)


def _check_directory(out_dir: str, run: dict, resume: bool) -> str:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"{out_dir} exists and is not a directory"
    earlier = None
    for name in (RUN, MANIFEST):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            try:
                earlier = read_json(path)
            except StoreError as e:
                return str(e)
            break
    if earlier is None:
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            return (f"{out_dir} is not empty and holds no activation store: choose a new directory "
                    "(nothing there was changed)")
    elif not resume:
        for entry in list(earlier.get("entries", {})) + [TOKENS]:
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
        for name in (MANIFEST, STATS, RUN):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    else:
        differences = [f"{key} ({_short(earlier.get(key))} there, {_short(run[key])} now)"
                       for key in ("model", "data", "entries", "options", "layout") if earlier.get(key) != run[key]]
        if differences:
            return (f"{out_dir} holds a store collected with a different " + "; a different ".join(differences)
                    + ": resume only continues the same collection. Use another out_dir, or resume=False "
                    "to replace that store")
        _remove_partial_writes(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, RUN), run)
    return ""


def _remove_partial_writes(out_dir: str) -> None:
    """Temporary files a crashed run left (see :func:`.format.atomic_write`)."""
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if ".tmp" in name and name.rsplit(".tmp", 1)[1].isdigit():
                os.remove(os.path.join(folder, name))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _agree(out_dir: str, topo: Any, done: list[int]) -> set[int]:
    """The chunks complete on every rank of this replica (the same answer on all of them)."""
    if not topo.distributed:
        return set(done)
    everyone = gather_object(done, dst=0)
    if topo.rank == 0:
        size = topo.pp * topo.tp
        agreed = [sorted(set.intersection(*(set(everyone[r]) for r in range(d * size, (d + 1) * size))))
                  for d in range(topo.dp)]
    else:
        agreed = None
    return set(broadcast_object(agreed, 0)[topo.dp_rank])


# ---------------------------------------------------------------------- the traces


def _tokenize(model: Any, texts: list[str], max_length: Optional[int]) -> list[list[int]]:
    if max_length is None:
        return [list(ids) for ids in model.tokenizer(texts)["input_ids"]]
    return [list(ids) for ids in model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


class _Recorder:
    """Runs one trace per batch and keeps the real tokens' rows of the entries this rank writes."""

    def __init__(self, model: Any, entries: list[Entry], writes: set[str], dtype: Optional[torch.dtype]) -> None:
        self.model = model
        self.entries = entries
        self.writes = writes  #: the names of the entries this rank writes
        self.dtype = dtype
        self.values: dict[str, torch.Tensor] = {}
        self.mask = torch.zeros((0, 0), dtype=torch.bool)

    def run(self, rows: list[list[int]], first_document: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Trace ``rows`` (token ids; empty ones are left out); this rank's rows per entry it
        writes, and the tokens index ``(document, position, token id)``."""
        kept = [i for i, r in enumerate(rows) if r]
        self.values = {}
        if not kept:
            return {name: torch.zeros(0) for name in self.writes}, torch.zeros((0, 3), dtype=torch.long)
        prompt = [rows[i] for i in kept]
        _, batch, _, _ = self.model._batch([((prompt,), {})])  # the layout the trace will use
        mask = self.mask = batch["attention_mask"].bool().cpu()
        model = self.model
        with torch.no_grad(), model.trace(prompt) as tracer:  # observe only: no graph kept
            _attach(self, tracer)
        missing = sorted(self.writes - set(self.values))
        if missing:
            raise StoreError(f"{missing[0]} was not visited by the forward pass, so it has no activations to store")
        document = (torch.tensor(kept, dtype=torch.long) + first_document)[:, None].expand_as(mask)[mask]
        position = (mask.long().cumsum(1) - 1)[mask]
        return self.values, torch.stack([document, position, batch["input_ids"].cpu()[mask]], 1)

    def observer(self, entry: Entry) -> Any:
        def record(value: Any, visit: int) -> None:
            if entry.name not in self.writes:
                return
            if visit > 0 or entry.name in self.values:
                raise StoreError(f"{entry.module} runs more than once in a forward pass: its visits cannot be "
                                 "stored as one row per token")
            self.values[entry.name] = self.rows(entry, value)

        return record

    def rows(self, entry: Entry, value: Any) -> torch.Tensor:
        """The rows of the real tokens of the stored element of ``value``."""
        if entry.key == "input":
            value = _first_value(value)
        elif isinstance(value, (tuple, list)):
            value = value[0] if value else None
        elif isinstance(value, dict) or hasattr(value, "to_tuple"):
            value = next(iter(value.values()), None)
        mask = self.mask
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != tuple(mask.shape):
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
            raise StoreError(f"{entry.name} is {what}, not a [batch {mask.shape[0]}, sequence {mask.shape[1]}, ...] "
                             "tensor: only per-token values can be stored")
        if entry.sharded and (entry.dim % value.dim()) < 2:
            raise StoreError(f"{entry.name} is sharded along dimension {entry.dim} of a {value.dim()}-d value: "
                             "pass gather_tp=True to store it whole")
        out = value.detach()[mask.to(value.device)]
        if self.dtype is not None and out.is_floating_point():
            out = out.to(self.dtype)
        return out.cpu()


def _attach(recorder: _Recorder, tracer: Any) -> None:
    """Observe every entry of ``recorder`` in ``tracer``'s run (called inside the trace body)."""
    il = tracer.interleaver
    for entry in recorder.entries:
        fragment_kept = entry.sharded or entry.placement == "whole"
        il.observe(entry.location, recorder.observer(entry), local=fragment_kept, routed=False)


class _Bar:
    """Rank 0's progress: documents, with tokens/s and MB/s written."""

    def __init__(self, show: bool, total: int, writer: ChunkWriter) -> None:
        self.writer = writer
        self.start = time.monotonic()
        self.tokens = 0
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="doc", desc="collect", dynamic_ncols=True)

    def update(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s, {self.writer.bytes_written / elapsed / 1e6:,.1f} MB/s",
                                 refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
