"""Reading an activation store: whole values from chunk files, in one plain process.

:class:`ActivationStore` opens a store's ``manifest.json`` (see :mod:`.format` for the
layout) and answers from the files it lists; no process group is needed. ``store[name]``
is an :class:`EntryReader`, indexed by rows like a tensor of shape ``(num_tokens,
*feature shape)``: it reads only the chunks and rows asked for, memory-mapped, and makes
whole values of entries stored as shards (the tensor-parallel files of a chunk
concatenated along the entry's ``dim``, or summed when the entry is ``partial``).

:meth:`ActivationStore.iter_batches` streams batches; shuffled, it visits the chunks in
a seeded random order and draws each batch at random from a bounded buffer of rows, so
memory follows the buffer, not the store, and every row comes out exactly once per pass.
"""

from __future__ import annotations

import bisect
import operator
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from . import format as fmt
from .format import StoreError

#: Rows of one chunk closer than this are read in one span (one read beats many tiny ones).
READ_GAP = 64

Rows = Union[int, slice, Sequence[int], Sequence[bool], torch.Tensor]


class EntryReader:
    """The rows of one entry: indexed like a tensor of shape :attr:`shape`, whole values."""

    def __init__(self, store: "ActivationStore", name: str):
        self.name = name
        self.info: dict = store.manifest["entries"][name]
        self.shape: tuple[int, ...] = (store.num_tokens, *self.info["shape"])
        self.dtype: torch.dtype = fmt.dtype_of(self.info["dtype"])
        self._root = store.path
        self._starts = store._starts
        self._records: list[list[dict]] = []
        shards = int(self.info["shards"])
        for chunk in store.manifest["chunks"]:
            records = chunk["files"].get(name)
            if not isinstance(records, list) or len(records) != shards:
                raise StoreError(f"{store.path}: chunk r{chunk['replica']}-c{chunk['index']} lists "
                                 f"{0 if records is None else len(records)} files of {name!r}, the "
                                 f"entry has {shards} shards: the manifest is damaged")
            self._records.append(records)
        # The row dimension the shard files concatenate along, or None: terms of a sum.
        self._dim: Optional[int] = self.info.get("dim")

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"EntryReader({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def __getitem__(self, rows: Rows) -> torch.Tensor:
        """The whole values of ``rows``: an int (one row, no row dimension), a slice (any
        step), a list or 1-D integer tensor of indices (any order, repeats allowed) or a
        1-D boolean mask of length ``len(self)``. Negative indices count from the end."""
        n = len(self)
        if isinstance(rows, torch.Tensor) and rows.dim() == 0:
            rows = rows.item()
        if isinstance(rows, bool) or isinstance(rows, float):
            raise TypeError(f"rows of {self.name!r} are indexed by an int, a slice, indices or a "
                            f"bool mask, not {type(rows).__name__}")
        if not isinstance(rows, (slice, tuple, list, torch.Tensor)) and hasattr(rows, "__index__"):
            i = operator.index(rows)  # int, numpy integer
            if not -n <= i < n:
                raise IndexError(f"row {i} is out of range for {self.name!r} with {n} rows")
            i %= n
            return self.read_range(i, i + 1)[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self.read_range(start, max(start, stop))
            return self.read_indices(torch.arange(start, stop, step))
        if isinstance(rows, tuple):
            raise TypeError(f"{self.name!r} is indexed by rows only; index the result for features")
        index = torch.as_tensor(rows)
        if index.dim() != 1:
            raise IndexError(f"row indices of {self.name!r} must be 1-D, got shape {tuple(index.shape)}")
        if index.dtype == torch.bool:
            if index.numel() != n:
                raise IndexError(f"a row mask of {self.name!r} must have {n} elements, got {index.numel()}")
            return self.read_indices(index.nonzero().flatten())
        if index.numel() == 0:  # as_tensor([]) is float: an empty list is no rows
            return self._empty()
        if index.dtype.is_floating_point or index.dtype.is_complex:
            raise IndexError(f"row indices must be integers, got {index.dtype}")
        index = index.long()
        bad = (index < -n) | (index >= n)
        if bool(bad.any()):
            raise IndexError(f"row {int(index[bad][0])} is out of range for {self.name!r} with {n} rows")
        return self.read_indices(torch.where(index < 0, index + n, index))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (``0 <= start <= stop <= len``), reading each chunk they touch once."""
        parts = []
        c = max(0, bisect.bisect_right(self._starts, start) - 1)
        while start < stop:
            first, end = self._starts[c], self._starts[c + 1]
            take = min(stop, end)
            if take > start:
                parts.append(self.read_chunk(c, [(start - first, take - first)])[0])
            start = max(start, take)
            c += 1
        return torch.cat(parts) if parts else self._empty()

    def read_indices(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at ``index`` (1-D, in range, any order, repeats allowed), in that order."""
        if index.numel() == 0:
            return self._empty()
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        starts = torch.tensor(self._starts)
        chunk_of = torch.searchsorted(starts, unique, right=True) - 1
        chunks, counts = torch.unique_consecutive(chunk_of, return_counts=True)
        parts, at = [], 0
        for c, count in zip(chunks.tolist(), counts.tolist()):
            local = unique[at:at + count] - self._starts[c]
            at += count
            # Spans of nearby rows: a break wherever the next wanted row is far.
            breaks = ((local[1:] - local[:-1]) > READ_GAP).nonzero().flatten().tolist()
            bounds = list(zip([0] + [b + 1 for b in breaks], [b + 1 for b in breaks] + [count]))
            spans = [(int(local[a]), int(local[b - 1]) + 1) for a, b in bounds]
            for (a, b), (lo, hi), values in zip(bounds, spans, self.read_chunk(c, spans)):
                parts.append(values if b - a == hi - lo else values[local[a:b] - lo])
        out = torch.cat(parts)
        return out if unique.numel() == index.numel() and bool((unique == index).all()) else out[inverse]

    def read_chunk(self, c: int, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Whole values of rows ``start:stop`` of chunk ``c`` for each span: each shard file
        read once, the shards concatenated along the entry's ``dim`` (summed when partial)."""
        records = self._records[c]
        per_file = [fmt.read_spans(self._root, record, spans) for record in records]
        out = []
        for i, (start, stop) in enumerate(spans):
            parts = [values[i] for values in per_file]
            try:
                value = parts[0] if len(parts) == 1 else self._combine(parts)
            except RuntimeError as e:
                raise StoreError(f"{_files(self._root, records)}: the shards of rows {start}:{stop} do "
                                 f"not fit together ({e}): the chunk does not match the manifest") from None
            expected = (stop - start, *self.shape[1:])
            if tuple(value.shape) != expected or value.dtype != self.dtype:
                raise StoreError(f"{_files(self._root, records)}: rows {start}:{stop} are "
                                 f"{tuple(value.shape)} {value.dtype}, the manifest says {expected} "
                                 f"{self.dtype}: the chunk does not match the manifest")
            out.append(value)
        return out

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self._dim is not None:
            return torch.cat(parts, dim=self._dim)
        total = parts[0]  # a fresh tensor (read from the file), safe to add into
        for part in parts[1:]:  # in tensor-parallel rank order, as a reduction would
            total += part
        return total

    def _empty(self) -> torch.Tensor:
        return torch.empty((0, *self.shape[1:]), dtype=self.dtype)


class Batches:
    """An iterator of batches of one entry's whole values (see
    :meth:`ActivationStore.iter_batches`). :attr:`buffer_rows` is the bound of rows held
    at once when shuffling; :attr:`peak_rows` the most rows the buffer held so far."""

    def __init__(self, entry: EntryReader, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, buffer_rows: Optional[int]):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.entry = entry
        self.batch_size = batch_size
        self.drop_last = drop_last
        sizes = [b - a for a, b in zip(entry._starts, entry._starts[1:])]
        if buffer_rows is None:
            two_chunks = sum(sorted(sizes, reverse=True)[:2])
            buffer_rows = min(max(8 * batch_size, two_chunks), max(len(entry), batch_size))
        if buffer_rows < batch_size:
            raise ValueError(f"buffer_rows ({buffer_rows}) must hold a batch ({batch_size} rows)")
        self.buffer_rows = buffer_rows
        self.peak_rows = 0
        self._sizes = sizes
        self._batches = self._shuffled(seed) if shuffle else self._in_order()

    def __len__(self) -> int:
        n, b = len(self.entry), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._batches)

    def _in_order(self) -> Iterator[torch.Tensor]:
        """Rows in store order, read at most a batch at a time."""
        pending: list[torch.Tensor] = []
        have = 0
        for c, size in enumerate(self._sizes):
            at = 0
            while at < size:
                take = min(size - at, self.batch_size - have)
                pending.append(self.entry.read_chunk(c, [(at, at + take)])[0])
                at, have = at + take, have + take
                self.peak_rows = max(self.peak_rows, have)
                if have == self.batch_size:
                    yield torch.cat(pending)
                    pending, have = [], 0
        if have and not self.drop_last:
            yield torch.cat(pending)

    def _shuffled(self, seed: int) -> Iterator[torch.Tensor]:
        """Chunks in a seeded random order, read into a buffer of at most
        ``buffer_rows`` rows; each batch is drawn uniformly at random from the buffer and
        the buffer is refilled from the current chunk. All randomness comes from one
        ``torch.Generator`` seeded with ``seed``, so a pass is a function of the seed."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self._sizes), generator=g).tolist()
        bs, cap = self.batch_size, self.buffer_rows
        buf = torch.empty((cap, *self.entry.shape[1:]), dtype=self.entry.dtype)
        n = 0
        for c in order:
            at, size = 0, self._sizes[c]
            while at < size:
                take = min(size - at, cap - n)
                buf[n:n + take] = self.entry.read_chunk(c, [(at, at + take)])[0]
                at, n = at + take, n + take
                self.peak_rows = max(self.peak_rows, n)
                if n == cap:
                    pick = torch.randperm(n, generator=g)[:bs]
                    yield buf[pick]
                    n = _remove(buf, n, pick)
        # The source is spent: the rest of the buffer in a random order.
        rest = torch.randperm(n, generator=g)
        for at in range(0, n, bs):
            if at + bs <= n or not self.drop_last:
                yield buf[rest[at:at + bs]]


def _remove(buf: torch.Tensor, n: int, pick: torch.Tensor) -> int:
    """Drop rows ``pick`` from the first ``n`` rows of ``buf`` by moving the unpicked rows of
    the tail into the holes (O(batch), not O(buffer)); the new row count."""
    keep = n - pick.numel()
    picked = torch.zeros(n, dtype=torch.bool)
    picked[pick] = True
    holes = pick[pick < keep]
    tail = torch.arange(keep, n)[~picked[keep:]]
    buf[holes] = buf[tail]
    return keep


class ActivationStore:
    """A store written by ``collect_activations``, opened for reading (see the module
    docstring). Needs no process group; every read is memory-mapped and bounded by what is
    asked for."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]):
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, fmt.MANIFEST)
        try:
            manifest = fmt.read_json(manifest_path)
        except FileNotFoundError:
            if os.path.exists(os.path.join(self.path, fmt.RUN)):
                raise StoreError(f"{self.path} has no {fmt.MANIFEST}: the collection did not finish; "
                                 "rerun collect_activations with resume=True") from None
            raise StoreError(f"{self.path} has no {fmt.MANIFEST}: it is not an activation store, or "
                             "its collection is incomplete") from None
        if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise StoreError(f"{manifest_path} is not an activation store manifest (format {got!r}, "
                             f"expected {fmt.FORMAT!r})")
        if manifest.get("version") != fmt.VERSION:
            raise StoreError(f"{manifest_path} has format version {manifest.get('version')!r}; this "
                             f"reader knows version {fmt.VERSION}: use the nnsight_dist that wrote it")
        self.manifest: dict = manifest
        #: Entry names in the model's module order (the manifest's entries are key-sorted).
        self.modules: list[str] = list(manifest.get("order") or manifest["entries"])
        self.num_tokens: int = int(manifest["num_tokens"])
        self._starts = self._row_starts()
        self._entries: dict[str, EntryReader] = {}

    def _row_starts(self) -> list[int]:
        """Each chunk's first row, then the row count: chunks must tile the rows in order."""
        starts = [0]
        for chunk in self.manifest["chunks"]:
            if chunk["first_row"] != starts[-1]:
                raise StoreError(f"{self.path}: chunk r{chunk['replica']}-c{chunk['index']} starts at "
                                 f"row {chunk['first_row']}, expected {starts[-1]}: the manifest is damaged")
            starts.append(starts[-1] + int(chunk["rows"]))
        if starts[-1] != self.num_tokens:
            raise StoreError(f"{self.path}: the chunks hold {starts[-1]} rows, the manifest says "
                             f"{self.num_tokens} tokens: the manifest is damaged")
        return starts

    def entry_name(self, name: str) -> str:
        """The entry ``name`` denotes: an entry name (``model.layers.0.mlp``, with
        ``.input`` for an input) or the same with the model's root prefix
        (``model.model.layers.0.mlp``). An unknown name is a ``KeyError``."""
        entries = self.manifest["entries"]
        if name in entries:
            return name
        prefix = self.manifest.get("model", {}).get("root", "model") + "."
        if name.startswith(prefix) and name[len(prefix):] in entries:
            return name[len(prefix):]
        known = ", ".join(self.modules[:5]) + (", ..." if len(self.modules) > 5 else "")
        raise KeyError(f"{name!r} is not in the store at {self.path} ({len(self.modules)} entries: "
                       f"{known})")

    def __getitem__(self, name: str) -> EntryReader:
        """The reader of one entry (see :meth:`entry_name` for the names accepted)."""
        name = self.entry_name(name)
        if name not in self._entries:
            self._entries[name] = EntryReader(self, name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.entry_name(name)
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return (f"ActivationStore({self.path!r}, {len(self)} entries, {self.num_tokens} tokens, "
                f"{len(self.manifest['chunks'])} chunks)")

    def iter_batches(self, module: str, batch_size: int = 4096, shuffle: bool = True,
                     seed: int = 0, drop_last: bool = False,
                     buffer_rows: Optional[int] = None) -> Batches:
        """Batches ``[b, *feature shape]`` of ``module``'s whole values, every row exactly
        once per pass (the last batch smaller unless ``drop_last``).

        Unshuffled, rows come in store order, read a batch at a time. Shuffled, chunks are
        visited in an order drawn from ``torch.Generator().manual_seed(seed)`` and their
        rows stream through a buffer of at most ``buffer_rows`` rows (default:
        ``max(8 * batch_size, the two largest chunks' rows)``, capped at the store's rows)
        from which each batch is drawn at random; the same seed gives the same batches.
        Memory is the buffer (plus the rows of one read, at most the buffer's free space),
        never the store. The returned iterator's ``peak_rows`` reports the buffer's peak."""
        return Batches(self[module], batch_size, shuffle, seed, drop_last, buffer_rows)

    def tokens(self) -> dict[str, torch.Tensor]:
        """Every row's ``document``, ``position`` and ``token_id`` (1-D int64, store order)."""
        parts = [fmt.read_rows(self.path, chunk["files"][fmt.TOKENS][0])
                 for chunk in self.manifest["chunks"]]
        table = torch.cat(parts) if parts else torch.empty((0, 3), dtype=torch.long)
        if table.shape != (self.num_tokens, 3):
            raise StoreError(f"{self.path}: the tokens chunks hold shape {tuple(table.shape)}, expected "
                             f"({self.num_tokens}, 3): the store is damaged")
        table = table.long()
        return {"document": table[:, 0], "position": table[:, 1], "token_id": table[:, 2]}

    def stats(self, module: str) -> dict[str, Any]:
        """Statistics of ``module``'s whole rows over the store, from ``stats.safetensors``:
        ``count`` (rows), ``mean`` and ``std`` (population standard deviation) per feature
        (float64, the feature shape), and ``norm``, the root of the mean squared L2 norm
        of the rows."""
        name = self.entry_name(module)
        keys = [f"{name}/{s}" for s in ("count",) + fmt.STAT_NAMES]
        t = fmt.read_tensors(self.path, self.manifest["stats"], keys)
        count = int(t[keys[0]].reshape(-1)[0])
        total, total_sq = t[keys[1]].double(), t[keys[2]].double()
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)  # rounding can go a hair below 0
        norm = float((t[keys[3]].double().reshape(-1)[0] / count).sqrt())
        return {"count": count, "mean": mean, "std": var.sqrt(), "norm": norm}

    def records(self) -> list[dict]:
        """Every file record the manifest lists: each chunk's files, then the statistics."""
        out = [r for chunk in self.manifest["chunks"] for records in chunk["files"].values()
               for r in records]
        return out + [self.manifest["stats"]]

    def verify(self, progress: bool = False) -> dict[str, int]:
        """Check every file the manifest lists: it exists, has the recorded size and
        sha256. Raises :class:`StoreError` naming the first bad file and how many are bad;
        otherwise ``{"files": checked, "bytes": checked}``."""
        records = self.records()
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(r["bytes"] for r in records), unit="B", unit_scale=True,
                       desc="verify")
        bad: list[str] = []
        checked = 0
        try:
            for record in records:
                path = os.path.join(self.path, record["file"])
                problem = _check(path, record)
                if problem:
                    bad.append(f"{path} {problem}")
                checked += record["bytes"]
                if bar is not None:
                    bar.update(record["bytes"])
        finally:
            if bar is not None:
                bar.close()
        if bad:
            raise StoreError(f"{bad[0]} ({len(bad)} of {len(records)} files bad; the store is damaged: "
                             "recollect the damaged chunks with collect_activations(resume=True) after "
                             "deleting them)")
        return {"files": len(records), "bytes": checked}

    def describe(self) -> str:
        """A readable summary: the model, data, layout and, per entry, its shape, dtype,
        placement, how it is stored and its size on disk."""
        m = self.manifest
        sizes = {name: 0 for name in self.modules}
        for chunk in m["chunks"]:
            for name, records in chunk["files"].items():
                if name in sizes:
                    sizes[name] += sum(r["bytes"] for r in records)
        total = sum(r["bytes"] for r in self.records())
        layout = m.get("layout", {})
        lines = [
            f"activation store {self.path}",
            f"  model     {m.get('model', {}).get('name', '?')} (root {m.get('model', {}).get('root', '?')!r})",
            f"  tokens    {self.num_tokens} from {m.get('data', {}).get('documents', '?')} documents, "
            f"{len(m['chunks'])} chunks",
            "  layout    " + ", ".join(f"{k}={layout[k]}" for k in ("world_size", "tp", "pp", "dp")
                                       if k in layout),
            f"  size      {_bytes(total)}",
            "",
        ]
        rows = [("entry", "shape", "dtype", "placement", "stored", "size")]
        for name in self.modules:
            e = m["entries"][name]
            shards = int(e["shards"])
            stored = "whole" if shards == 1 else (
                f"{shards} shards, dim {e['dim']}" if e.get("dim") is not None else f"{shards} partial terms")
            shape = "(" + ", ".join(str(d) for d in (self.num_tokens, *e["shape"])) + ")"
            rows.append((name, shape, e["dtype"], str(e.get("placement")), stored, _bytes(sizes[name])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return "\n".join(lines)


def _check(path: str, record: dict) -> Optional[str]:
    """What is wrong with one recorded file, or ``None``."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "is missing"
    if size != record["bytes"]:
        return f"has {size} bytes, the manifest says {record['bytes']} (truncated or replaced)"
    if fmt.sha256_file(path) != record["sha256"]:
        return "has the recorded size but not the recorded sha256 (its content changed)"
    return None


def _files(root: str, records: list[dict]) -> str:
    return ", ".join(os.path.join(root, r["file"]) for r in records)


def _bytes(n: float) -> str:
    """``n`` bytes, readably (``512 B``, ``3.4 MiB``)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    else:
        unit, n = "TiB", n / 1024
    return f"{n:.1f} {unit}"
