"""The chunk writer: chunks go to disk on a thread beside compute, through a bounded queue.

The collection hands over each batch's rows (already cut to real tokens) with :meth:`put`
and closes a chunk with :meth:`end_chunk`; the thread concatenates the chunk's rows per
file, computes their statistics, and writes each file atomically (see :mod:`.format`).
The queue holds at most ``max_pending`` batches: when the disk is slower than the model,
:meth:`put` waits, so memory stays bounded by the queue and one chunk in assembly whatever
the size of the data. An error on the thread (a full disk, say) is raised by the next
:meth:`put`, :meth:`end_chunk` or :meth:`close` on the collecting thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

import torch

from .format import ROWS, TOKENS, write_chunk

_END = object()


def row_stats(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of ``rows`` ([rows, *features]) stored beside them, as float64.

    Summed in float32 (pairwise, so about 1e-7 relative within a chunk: four times faster
    than float64 sums) and kept in float64 from there on, across chunks and replicas."""
    x = rows.float()
    squares = (x * x).sum(0)
    return {"sum": x.sum(0).double(), "sum_sq": squares.double(), "sum_sq_norm": squares.double().sum().reshape(1)}


class ChunkWriter:
    """Writes the chunks of one collection in ``root`` on a background thread."""

    def __init__(self, root: str, max_pending: int = 4) -> None:
        self.root = root
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="nnsight_dist-store-writer", daemon=True)
        self._thread.start()

    def put(self, rows: dict[str, torch.Tensor]) -> None:
        """Queue one batch: file name -> this batch's rows of that file (waits when full)."""
        self._put(("rows", rows))

    def end_chunk(self) -> None:
        """Write every file of the chunk whose batches were just put."""
        self._put(("end", None))

    def close(self) -> None:
        """Wait for every queued write; raise the thread's error if it had one."""
        if self._thread.is_alive():
            self._put((_END, None))
            self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop after the collection failed: chunks already ended are written (at most the
        queue's few batches), the rows of a chunk that was not ended are dropped."""
        if self._thread.is_alive():
            self._queue.put((_END, None))
            self._thread.join()

    def _put(self, item: tuple) -> None:
        self._raise()
        while True:
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("the store's writer thread ended unexpectedly")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        pending: dict[str, list[torch.Tensor]] = {}
        while True:
            kind, payload = self._queue.get()
            if kind is _END:
                return
            if self._error is not None:
                continue
            try:
                if kind == "rows":
                    for name, rows in payload.items():
                        pending.setdefault(name, []).append(rows)
                else:
                    for name, parts in pending.items():
                        # A batch of empty documents has no rows (nor a dtype or shape to keep).
                        parts = [p for p in parts if p.numel()] or parts[:1]
                        self._write(name, torch.cat(parts) if len(parts) > 1 else parts[0])
                    pending = {}
            except BaseException as error:  # raised on the collecting thread
                self._error = error

    def _write(self, name: str, rows: torch.Tensor) -> None:
        tensors = {ROWS: rows}
        if not name.startswith(TOKENS + "/"):  # an entry (integer ones too): its statistics
            tensors.update(row_stats(rows))
        self.bytes_written += write_chunk(self.root, name, tensors)["bytes"]
