"""The end of a collection: every rank's records and statistics, made into the manifest.

Each rank knows only its own chunk files (their sidecar records) and the statistics in
them. :func:`finish` gathers both to rank 0, which lists every chunk in row order (replica,
then chunk index) with the files of every entry (one per tensor-parallel rank for shards),
combines the statistics (summed over replicas and chunks, concatenated by feature over
shards), writes ``stats.safetensors`` and then ``manifest.json``, last. Every rank raises
the same error if rank 0 cannot write them. See :mod:`.format` for the schema.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import torch
from safetensors.torch import save as save_bytes

from ..distributed.exchange import broadcast_object, gather_object
from .format import (MANIFEST, STAT_NAMES, STATS, TOKENS, StoreError, atomic_write, chunk_name, dtype_name,
                     read_rows, read_tensors, write_json)
from .plan import Entry


def finish(out_dir: str, run: dict, topo: Any, entries: list[Entry], records: dict, n_chunks: int) -> None:
    """Every rank's records and statistics to rank 0, which writes the manifest last."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    problem = ""
    try:
        for name, record in records.items():
            if name.startswith(TOKENS + "/") or not record["rows"]:
                continue  # the tokens index has no statistics; an empty chunk adds none
            totals = stats.setdefault(name.split("/")[0], {})
            for stat, value in read_tensors(out_dir, record, STAT_NAMES).items():
                totals[stat] = value if stat not in totals else totals[stat] + value
            totals["count"] = totals.get("count", 0) + record["rows"]
    except (OSError, StoreError) as e:  # told to every rank through rank 0
        problem = f"rank {topo.rank}: {e}"
    mine = {"rank": [topo.dp_rank, topo.pp_rank, topo.tp_rank], "chunks": n_chunks,
            "records": records, "stats": stats, "problem": problem}
    everyone = gather_object(mine, dst=0) if topo.distributed else [mine]
    error = ""
    if topo.rank == 0:
        error = next((part["problem"] for part in everyone if part["problem"]), "")
        try:
            if not error:
                _write_manifest(out_dir, run, entries, everyone)
        except (OSError, StoreError) as e:
            error = f"rank 0 could not write the manifest of {out_dir}: {e}"
    error = broadcast_object(error, 0) if topo.distributed else error
    if error:
        raise StoreError(error)


def _write_manifest(out_dir: str, run: dict, entries: list[Entry], everyone: list[dict]) -> None:
    tp = run["layout"]["tp"]
    by_file = {name: record for part in everyone for name, record in part["records"].items()}
    chunks, first_row = [], 0
    n_chunks = {part["rank"][0]: part["chunks"] for part in everyone}
    for replica in sorted(n_chunks):
        for c in range(n_chunks[replica]):
            tokens = by_file[chunk_name(TOKENS, replica, c)]
            files = {TOKENS: [tokens]}
            for e in entries:
                files[e.name] = [by_file[chunk_name(e.name, replica, c, t)] for t in (range(tp) if e.sharded else [0])]
            chunks.append({"replica": replica, "index": c, "first_row": first_row, "rows": tokens["rows"],
                           "documents": _documents(out_dir, tokens), "files": files})
            first_row += tokens["rows"]
    stats_tensors = {}
    entry_info = {}
    for e in entries:
        parts = [(part["rank"], part["stats"][e.name]) for part in everyone if e.name in part["stats"]]
        shape, dtype = _shape_dtype(out_dir, chunks, e)
        dim = None if not e.sharded else (e.dim if e.dim < 0 else e.dim - 1)
        if dim is not None and dim < 0:
            dim += 1 + len(shape)
        if parts:
            total = _combine(parts, e.sharded, dim)
            for stat, value in total.items():
                stats_tensors[f"{e.name}/{stat}"] = value
        entry_info[e.name] = {"module": e.module[len(run["model"]["root"]) + 1:], "key": e.key, "shape": shape,
                              "dtype": dtype, "placement": e.placement, "dim": dim,
                              "shards": tp if e.sharded else 1, "owner_stage": e.owner_stage}
    data = save_bytes({k: v.contiguous() for k, v in sorted(stats_tensors.items())})
    atomic_write(os.path.join(out_dir, STATS), data)
    manifest = {**{k: run[k] for k in ("format", "version", "model", "data", "options", "layout")},
                "num_tokens": first_row, "entries": entry_info, "order": [e.name for e in entries], "chunks": chunks,
                "stats": {"file": STATS, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": 0}}
    write_json(os.path.join(out_dir, MANIFEST), manifest)


def _documents(out_dir: str, tokens: dict) -> list[int]:
    if tokens["rows"] == 0:
        return [0, 0]
    column = read_rows(out_dir, tokens)[:, 0]
    return [int(column.min()), int(column.max()) + 1]


def _shape_dtype(out_dir: str, chunks: list[dict], e: Entry) -> tuple[list[int], str]:
    """The whole row shape and dtype of ``e``, from the header of its first non-empty chunk."""
    for chunk in chunks:
        if chunk["rows"]:
            parts = [read_rows(out_dir, r, 0, 1) for r in chunk["files"][e.name]]
            if e.sharded:
                d = e.dim if e.dim < 0 else e.dim - 1
                whole = torch.cat(parts, d)
            else:
                whole = parts[0]
            return list(whole.shape[1:]), dtype_name(whole.dtype)
    return [], "float32"


def _combine(parts: list, sharded: bool, dim: Optional[int]) -> dict[str, torch.Tensor]:
    """Totals over replicas (summed) and shards (concatenated by feature, norms summed)."""
    by_tp: dict[int, dict[str, torch.Tensor]] = {}
    for (replica, _, tp_rank), stats in parts:
        slot = by_tp.setdefault(tp_rank if sharded else 0, {})
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float64) if k == "count" else v
            slot[k] = v if k not in slot else slot[k] + v
    shards = [by_tp[t] for t in sorted(by_tp)]
    feature_dim = (dim - 1) if dim is not None else 0
    return {
        "count": shards[0]["count"].reshape(1),
        "sum": torch.cat([s["sum"] for s in shards], feature_dim) if sharded else shards[0]["sum"],
        "sum_sq": torch.cat([s["sum_sq"] for s in shards], feature_dim) if sharded else shards[0]["sum_sq"],
        "sum_sq_norm": sum(s["sum_sq_norm"] for s in shards),
    }
