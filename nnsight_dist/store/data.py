"""Documents to collect over, and each data-parallel replica's share of them.

:class:`Documents` is an indexable sequence of strings made from a list, a ``.txt`` file (one
document per line), a ``.jsonl`` file (a ``text`` field per line) or a ``datasets`` column.
Files are not loaded whole: one pass records where each line starts (8 bytes a document)
and hashes the bytes; a document is read when asked for. The *fingerprint* (sha256 of the
documents, each length-prefixed) names the data set in a store's manifest, whatever form
it came in, so a resume with other data is refused.

:func:`split_for_replica` gives each replica a contiguous block of the items; the blocks of
all replicas, in replica order, are the items in order, so a store's rows are in document
order. The split depends only on the item count and the mesh: the same on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

from ..distributed.topology import current
from .format import StoreError


def replica_range(n: int, dp_rank: int, dp: int) -> range:
    """Indices ``0..n`` of replica ``dp_rank`` of ``dp``: contiguous, sizes differing by one at most."""
    return range(n * dp_rank // dp, n * (dp_rank + 1) // dp)


def split_for_replica(items: Sequence[Any]) -> Sequence[Any]:
    """This data-parallel replica's share of ``items`` (a contiguous block; all of them in a
    single process or with one replica). Every rank of a replica gets the same share."""
    topo = current()
    if topo is None or topo.dp == 1:
        return items
    share = replica_range(len(items), topo.dp_rank, topo.dp)
    return items[share.start:share.stop]


class Documents:
    """The documents of a collection, indexable without loading a file whole (see the module)."""

    def __init__(self, data: Any) -> None:
        self._path: Optional[str] = None
        self._field: Optional[str] = None
        if isinstance(data, (str, os.PathLike)):
            self._open_file(os.fspath(data))
            return
        if hasattr(data, "column_names") and "text" in getattr(data, "column_names", ()):
            data = data["text"]  # a datasets.Dataset: its text column
        try:
            texts = list(data)
        except TypeError:
            raise StoreError(f"cannot collect over {type(data).__name__}: give a list of strings, a .txt or "
                             ".jsonl file, or a datasets column") from None
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise StoreError(f"document {bad} is a {type(texts[bad]).__name__}, not a string")
        self._texts: Optional[list[str]] = texts
        digest = hashlib.sha256()
        for t in texts:
            _add(digest, t.encode())
        self.fingerprint = digest.hexdigest()

    def _open_file(self, path: str) -> None:
        if not os.path.isfile(path):
            raise StoreError(f"data file {path} does not exist")
        kind = os.path.splitext(path)[1].lower()
        if kind not in (".txt", ".jsonl"):
            raise StoreError(f"data file {path}: expected a .txt (one document per line) or .jsonl "
                             "(a 'text' field per line) file")
        self._path, self._field, self._texts = path, "text" if kind == ".jsonl" else None, None
        starts: list[int] = []
        self._starts = starts  # filled as the lines are read (the first one may carry a BOM)
        digest = hashlib.sha256()
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip(b" \t\r\n\xef\xbb\xbf" if offset == 0 else None):
                    starts.append(offset)
                    _add(digest, self._decode(line, len(starts) - 1).encode())
                offset += len(line)
        self.fingerprint = digest.hexdigest()

    def _decode(self, line: bytes, index: int) -> str:
        # A byte-order mark opening the file is not part of the first document.
        text = line.decode("utf-8-sig" if self._starts_at_zero(index) else "utf-8").rstrip("\r\n")
        if self._field is None:
            return text
        try:
            record = json.loads(text)
            value = record[self._field]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{self._path}: line of document {index} is not a JSON object with a "
                             f"'{self._field}' field") from None
        if not isinstance(value, str):
            raise StoreError(f"{self._path}: the '{self._field}' of document {index} is not a string")
        return value

    def _starts_at_zero(self, index: int) -> bool:
        starts = getattr(self, "_starts", None)
        return bool(starts) and index < len(starts) and starts[index] == 0

    def __len__(self) -> int:
        return len(self._texts) if self._texts is not None else len(self._starts)

    def read(self, indices: range) -> list[str]:
        """The documents at ``indices`` (a range)."""
        if self._texts is not None:
            return self._texts[indices.start:indices.stop]
        out = []
        with open(self._path, "rb") as f:
            for i in indices:
                f.seek(self._starts[i])
                out.append(self._decode(f.readline(), i))
        return out


def _add(digest: Any, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
