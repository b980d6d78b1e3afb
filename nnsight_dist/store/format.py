"""The activation store on disk: a directory of safetensors chunks and a JSON manifest.

A *store* holds, for each *entry* (a module's output, or its first input, named by its
path relative to the model: ``model.layers.0.mlp`` and ``model.layers.0.mlp.input``), one
row per real token of the collected documents (padding is never stored). Rows are cut
into *chunks*: chunk ``c`` of data-parallel replica ``r`` holds the tokens of a fixed run
of that replica's documents, the same for every entry. Layout::

    manifest.json                      written last: what is in the store (see below)
    run.json                           written first: what the collection was asked to do
    stats.safetensors                  per entry: count, sum, sum of squares, sum of squared norms
    tokens/r0000-c000000.safetensors   "tokens": int64 [rows, 3] = (document, position, token id)
    <entry>/r0000-c000000-t00.safetensors   "rows": [rows, ...] of tensor-parallel rank 0
    <entry>/r0000-c000000-t01.safetensors   ... and of rank 1 when stored as shards
    <file>.json                        beside each chunk: its sha256, size and row count

A chunk file is written under a temporary name, fsynced and renamed, then its sidecar
(the same way): a chunk is complete exactly when its sidecar exists and names its size.
A chunk stored as shards has one file per tensor-parallel rank, concatenated along the
entry's ``dim`` (or summed when ``partial``) to make whole rows. Everything written is a
deterministic function of the model, the data and the options, so a rerun that skips
complete chunks ends byte-identical to an uninterrupted run. Nothing here is pickled.

An entry's chunk file holds, beside :data:`ROWS`, the float64 statistics of its rows
(:data:`STAT_NAMES`: ``sum`` and ``sum_sq`` over rows, per feature; ``sum_sq_norm``, the
sum of the rows' squared L2 norms, shape ``[1]``), so a resumed collection needs no pass
over old chunks. ``stats.safetensors`` holds the totals of every entry as
``"<entry>/count"``, ``"<entry>/sum"``, ``"<entry>/sum_sq"``, ``"<entry>/sum_sq_norm"``.

The manifest (JSON)::

    {"format": FORMAT, "version": 1,
     "model": {"name": str, "root": "model", "config_sha256": str},
     "data": {"fingerprint": str, "documents": int},
     "options": {"batch_size", "max_length", "dtype", "include_inputs", "gather_tp", "chunk_batches"},
     "layout": {"world_size", "tp", "pp", "dp"},
     "num_tokens": int,
     "order": [entry names in the model's module order],
     "entries": {name: {"module": path, "key": "output" | "input",
                        "shape": [feature dims of a whole row], "dtype": "float32",
                        "placement": the engine's placement of the value (its first element
                                     for a tuple output),
                        "dim": the row dimension the shard files concatenate along, or null,
                        "shards": files per chunk (tp, or 1 when stored whole),
                        "owner_stage": int or null}},
     "chunks": [{"replica": r, "index": c, "first_row": int, "rows": int,
                 "documents": [first, stop],
                 "files": {"tokens": [record], name: [record of tp rank 0, 1, ...]}}],
     "stats": record of stats.safetensors}

where a *record* is a sidecar's content ``{"file", "sha256", "bytes", "rows"}``. Chunks are
listed in row order (replica, then chunk index), which is document order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..intervention.errors import NNsightError

FORMAT = "nnsight_dist.activation_store"
VERSION = 1
MANIFEST = "manifest.json"
RUN = "run.json"
STATS = "stats.safetensors"
TOKENS = "tokens"
#: The tensor name inside an entry's chunk file, and inside a tokens chunk file.
ROWS = "rows"
STAT_NAMES = ("sum", "sum_sq", "sum_sq_norm")


class StoreError(NNsightError, ValueError):
    """A store that cannot be written or read as asked: a missing, truncated or corrupt
    file (named), a store of another model or data set, a pattern that matches nothing."""


def chunk_name(entry: str, replica: int, chunk: int, tp_rank: Optional[int] = None) -> str:
    """The path, relative to the store, of one chunk file (``tp_rank`` for entries)."""
    stem = f"r{replica:04d}-c{chunk:06d}"
    if entry == TOKENS:
        return f"{TOKENS}/{stem}.safetensors"
    return f"{entry}/{stem}-t{tp_rank or 0:02d}.safetensors"


def sidecar(path: str) -> str:
    """The sidecar (sha256, size, rows) of the chunk file at ``path``."""
    return path + ".json"


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that ``path`` is absent or complete, never partial:
    a temporary name in the same directory, fsync, rename, fsync of the directory."""
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
    _publish(tmp, path)


def _temporary(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"{path}.tmp{os.getpid()}"


def _publish(tmp: str, path: str, digest: Any = None) -> None:
    """fsync ``tmp`` (hashing it into ``digest`` meanwhile: the flush waits on the disk, the
    hash reads the page cache), rename it to ``path``, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        flush = threading.Thread(target=os.fsync, args=(fd,), name="nnsight_dist-fsync")
        flush.start()
        if digest is not None:
            with open(fd, "rb", closefd=False) as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        flush.join()
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, atomically (deterministic bytes)."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} cannot be read as JSON ({e}): the store is damaged") from None


def write_chunk(root: str, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one chunk file (the rows under :data:`ROWS`, and any small tensors beside them,
    such as the chunk's statistics) and its sidecar; the sidecar's record."""
    path = os.path.join(root, name)
    tmp = _temporary(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    digest = hashlib.sha256()
    _publish(tmp, path, digest)
    record = {"file": name, "sha256": digest.hexdigest(), "bytes": os.path.getsize(path),
              "rows": int(tensors[ROWS].shape[0])}
    write_json(sidecar(path), record)
    return record


def complete(root: str, name: str) -> Optional[dict]:
    """The sidecar record of a complete chunk file, or ``None`` when the chunk must be written
    (absent, cut short by a crash, or its sidecar unreadable)."""
    path = os.path.join(root, name)
    try:
        record = read_json(sidecar(path))
        size = os.path.getsize(path)
    except (OSError, StoreError):
        return None
    if not isinstance(record, dict) or record.get("file") != name or record.get("bytes") != size:
        return None
    return record


def read_rows(root: str, record: dict, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Rows ``start:stop`` of a chunk file, memory-mapped; a missing, truncated or corrupt
    file is a :class:`StoreError` naming it."""
    return read_spans(root, record, [(start, stop)])[0]


def read_spans(root: str, record: dict, spans: list[tuple[int, Optional[int]]]) -> list[torch.Tensor]:
    """Rows ``start:stop`` of a chunk file for each ``(start, stop)`` of
    ``spans`` (``stop`` ``None``: to the end), the file opened and memory-mapped once;
    errors as :func:`read_rows`."""
    with _opened(root, record) as (path, f):
        try:
            part = f.get_slice(ROWS)
            rows = part.get_shape()[0]
            return [part[start:rows if stop is None else stop] for start, stop in spans]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise StoreError(f"{path} cannot be read ({e}): the chunk is corrupt") from None


def read_tensors(root: str, record: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole tensors ``names`` of a file the manifest records (``stats.safetensors``, say);
    a missing name or file, or a truncated or corrupt one, is a :class:`StoreError`."""
    with _opened(root, record) as (path, f):
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise StoreError(f"{path} has no tensor {missing[0]!r}: the store is damaged")
        try:
            return {n: f.get_tensor(n) for n in names}
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{path} cannot be read ({e}): the file is corrupt") from None


@contextlib.contextmanager
def _opened(root: str, record: dict) -> Iterator[tuple[str, Any]]:
    """The path and ``safe_open`` handle of a recorded file whose size is the record's."""
    path = os.path.join(root, record["file"])
    try:
        size = os.path.getsize(path)
    except OSError:
        raise StoreError(f"{path} is missing: the store is incomplete (verify() lists every problem)") from None
    if size != record["bytes"]:
        raise StoreError(f"{path} has {size} bytes, the manifest says {record['bytes']}: the chunk is "
                         "truncated or was replaced")
    try:
        handle = safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"{path} cannot be read ({e}): the file is corrupt") from None
    with handle as f:
        yield path, f


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown dtype {name!r} in the manifest")
    return dtype
