"""Rows as Arrow tables of the output contract (store/schema.py), parts committed through
the output store (atomically, fenced), and the BackgroundWriter that feeds a PartWriter from
its own thread."""
from __future__ import annotations

import datetime as dt
import queue
import secrets
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .interrupts import deferred
from .store import LeaseLost, OutputError, Store, layout
from .store.schema import EMBEDDING, EMBEDDING_TYPE, SCHEMA, part_schema
from .types import ErrorRecord, ImageRef, Labels

@dataclass(frozen=True)
class RunStamp:
    """What every row of one run shares."""

    model: str
    run_id: str


def new_run_id() -> str:
    """Names the parts of one run (or one compaction): UTC time + random suffix."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _mtimes(refs: Sequence[ImageRef]) -> pa.Array:
    return pa.array([None if r.mtime_ns is None else r.mtime_ns // 1000 for r in refs],
                    pa.timestamp("us", tz="UTC"))


def _common(refs: Sequence[ImageRef], stamp: RunStamp, n: int) -> dict[str, pa.Array]:
    return {
        "image_id": pa.array([r.image_id for r in refs], pa.string()),
        "uri": pa.array([r.uri for r in refs], pa.string()),
        "file_size": pa.array([r.file_size for r in refs], pa.int64()),
        "mtime": _mtimes(refs),
        "model": pa.array([stamp.model] * n, pa.string()),
        "run_id": pa.array([stamp.run_id] * n, pa.string()),
        "labeled_at": pa.array([_now()] * n, pa.timestamp("us", tz="UTC")),
    }


def prediction_table(refs: Sequence[ImageRef], widths: np.ndarray, heights: np.ndarray,
                     top_idx: np.ndarray, top_scores: np.ndarray, stamp: RunStamp,
                     labels: Labels, content_sha256: Sequence[str | None] | None = None,
                     embeddings: np.ndarray | None = None) -> pa.Table:
    """Rows of labeled images: top_idx/top_scores [n, k] best first, indices into `labels`;
    `embeddings` [n, width] (L2-normalized) adds the embedding column."""
    n = len(refs)
    ids = np.asarray(labels.ids, dtype=object)[top_idx]
    names = np.asarray(labels.names, dtype=object)[top_idx]
    k = top_idx.shape[1] if n else 0
    offsets = pa.array(np.arange(0, n * k + 1, k or 1)[: n + 1], pa.int32())
    columns = _common(refs, stamp, n)
    columns.update({
        "status": pa.array(["ok"] * n, pa.string()),
        "error_kind": pa.nulls(n, pa.string()),
        "error": pa.nulls(n, pa.string()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "label_id": pa.array(ids[:, 0] if n else [], pa.string()),
        "label": pa.array(names[:, 0] if n else [], pa.string()),
        "score": pa.array(top_scores[:, 0] if n else [], pa.float32()),
        "label_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel(), pa.string())),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(names.ravel(), pa.string())),
        "scores": pa.ListArray.from_arrays(
            offsets, pa.array(top_scores.ravel().astype(np.float32), pa.float32())),
        "content_sha256": _hashes(content_sha256, n),
    })
    if embeddings is None:
        return pa.table(columns, schema=SCHEMA)
    columns[EMBEDDING] = embedding_array(embeddings)
    return pa.table(columns, schema=part_schema(embeddings.shape[1]))


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """[n, width] floats -> the embedding column (stored as float16)."""
    values = np.ascontiguousarray(embeddings, np.float16).ravel()
    return pa.FixedSizeListArray.from_arrays(pa.array(values, EMBEDDING_TYPE), embeddings.shape[1])


def _hashes(content_sha256: Sequence[str | None] | None, n: int) -> pa.Array:
    if content_sha256 is None:
        return pa.nulls(n, pa.string())
    return pa.array(list(content_sha256), pa.string())


def _header_sizes(values: list[int | None]) -> pa.Array:
    """An error row's width or height as its header claims it: null where int32 cannot hold
    the claim (the error message gives it)."""
    return pa.array([v if v is not None and -(1 << 31) <= v < (1 << 31) else None
                     for v in values], pa.int32())


def error_table(errors: Sequence[ErrorRecord], stamp: RunStamp) -> pa.Table:
    n = len(errors)
    refs = [e.ref for e in errors]
    columns = _common(refs, stamp, n)
    columns.update({
        "status": pa.array(["error"] * n, pa.string()),
        "error_kind": pa.array([e.kind for e in errors], pa.string()),
        "error": pa.array([e.message for e in errors], pa.string()),
        "width": _header_sizes([e.width for e in errors]),
        "height": _header_sizes([e.height for e in errors]),
        "label_id": pa.nulls(n, pa.string()),
        "label": pa.nulls(n, pa.string()),
        "score": pa.nulls(n, pa.float32()),
        "label_ids": pa.nulls(n, pa.list_(pa.string())),
        "labels": pa.nulls(n, pa.list_(pa.string())),
        "scores": pa.nulls(n, pa.list_(pa.float32())),
        "content_sha256": pa.array([e.content_sha256 for e in errors], pa.string()),
    })
    return pa.table(columns, schema=SCHEMA)


class PartWriter:
    """Collect rows and commit them as parts of part_size rows (layout.part_name), each one a
    fenced write: after the lock was lost, nothing more is committed (LeaseLost)."""

    def __init__(self, output: Store, run_id: str, part_size: int, metadata: dict[str, str],
                 embedding_width: int | None = None):
        self._output = output
        self._run_id = run_id
        self._part_size = part_size
        # error rows of an --embeddings run get a null embedding (see conform)
        self._schema = part_schema(embedding_width).with_metadata(
            {k: str(v) for k, v in metadata.items()})
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._seq = 0
        self._failed: OutputError | LeaseLost | None = None
        self.committed_rows = 0
        self.committed_parts: list[str] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(conform(table, self._schema))
        self._buffered += table.num_rows
        while self._buffered >= self._part_size:
            self._commit_rows(self._part_size)

    def commit(self) -> None:
        """Commit everything buffered (the last, possibly short, part)."""
        if self._buffered:
            self._commit_rows(self._buffered)

    def _commit_rows(self, n: int) -> None:
        if self._failed:  # after a failed write, write nothing more: the rows are redone next run
            raise self._failed
        with deferred():  # a signal lands before or after a part, never between rename and count
            table = pa.concat_tables(self._buffer)
            part, rest = table.slice(0, n), table.slice(n)
            name = layout.part_name(self._run_id, self._seq)
            self._seq += 1
            try:
                write_part(self._output, name, part.cast(self._schema))
            except (OutputError, LeaseLost) as e:
                self._failed = e
                raise
            self._buffer = [rest] if rest.num_rows else []
            self._buffered = rest.num_rows
            self.committed_rows += part.num_rows
            self.committed_parts.append(name)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: a column it lacks (content_sha256 of a
    part written before it existed, the embedding of an error row) is all null."""
    if table.schema.names == schema.names:
        return table.cast(schema)
    columns = [table.column(f.name).cast(f.type) if f.name in table.schema.names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def write_part(output: Store, name: str, table: pa.Table) -> None:
    """Readers never see half a part: the store writes it atomically (and fenced)."""
    output.write_file(name, lambda f: pq.write_table(table, f, compression="zstd"))


# -- writing on a background thread ----------------------------------------------------------

_STOP = object()
# Tables waiting for the writer. Building and writing rows takes milliseconds per batch, so two
# are enough to overlap; each one queued is finished work a SIGKILL would lose.
MAX_QUEUED = 2


class BackgroundWriter:
    """Feeds a PartWriter from a thread behind a bounded queue.

    `submit` takes a function that builds the rows, so building them (top-k, Arrow arrays) runs
    on the writer thread too. An error on that thread (e.g. disk full) is raised in the caller at
    its next `submit` or at `close`, and nothing more is written. `close` adds every table
    queued before it and commits the last part, also when the caller is unwinding from an
    interrupt, so finished rows are kept.
    """

    def __init__(self, writer: PartWriter, max_queued: int = MAX_QUEUED):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._error_raised = False
        self._closing = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="part-writer", daemon=True)
        self._thread.start()

    def submit(self, build_rows: Callable[[], pa.Table]) -> None:
        while True:
            self._raise_error()
            try:
                self._queue.put(build_rows, timeout=0.1)
                return
            except queue.Full:  # writer is behind (or dead: checked on the next round)
                continue

    def close(self) -> None:
        """Drain the queue, stop the thread, commit the last part; raise the thread's error.
        Safe to call twice and from two threads (a signal watchdog may call it while the main
        thread is stuck): the first call does the work, the others wait for it."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._close()

    def _close(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None:
            self._raise_error()
            return
        self._writer.commit()

    def _raise_error(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._writer.add(item())
            except BaseException as e:  # handed to the caller's thread
                self._error = e
                return
