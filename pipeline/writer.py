"""Parquet parts with an explicit schema, written atomically (atomic.py locally, one PUT on S3)."""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, storage
from .exitcodes import FatalError
from .interrupts import deferred
from .types import ErrorRecord, ImageRef

PART_PREFIX = "part-"

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_kind", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("file_size", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
    pa.field("label_id", pa.string()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("label_ids", pa.list_(pa.string())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("model", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("labeled_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


@dataclass(frozen=True)
class RunStamp:
    """What every row of one run shares."""

    model: str
    run_id: str
    label_ids: Sequence[str]
    label_names: Sequence[str]


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
                     top_idx: np.ndarray, top_scores: np.ndarray, stamp: RunStamp) -> pa.Table:
    n = len(refs)
    ids = np.asarray(stamp.label_ids, dtype=object)[top_idx]
    names = np.asarray(stamp.label_names, dtype=object)[top_idx]
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
    })
    return pa.table(columns, schema=SCHEMA)


def error_table(errors: Sequence[ErrorRecord], stamp: RunStamp) -> pa.Table:
    n = len(errors)
    refs = [e.ref for e in errors]
    columns = _common(refs, stamp, n)
    columns.update({
        "status": pa.array(["error"] * n, pa.string()),
        "error_kind": pa.array([e.kind for e in errors], pa.string()),
        "error": pa.array([e.message for e in errors], pa.string()),
        "width": pa.array([e.width for e in errors], pa.int32()),
        "height": pa.array([e.height for e in errors], pa.int32()),
        "label_id": pa.nulls(n, pa.string()),
        "label": pa.nulls(n, pa.string()),
        "score": pa.nulls(n, pa.float32()),
        "label_ids": pa.nulls(n, pa.list_(pa.string())),
        "labels": pa.nulls(n, pa.list_(pa.string())),
        "scores": pa.nulls(n, pa.list_(pa.float32())),
    })
    return pa.table(columns, schema=SCHEMA)


class OutputError(FatalError, OSError):
    """OUTPUT cannot take a part (full disk, read-only, no permission); exit code 4."""

    hint = "committed parts are kept, fix it and run the same command again"


class PartWriter:
    """Collect rows and commit them as `part-<run_id>-<seq>.parquet` files of part_size rows."""

    def __init__(self, output: str, run_id: str, part_size: int, metadata: dict[str, str]):
        self._output = output
        self._run_id = run_id
        self._part_size = part_size
        self._schema = SCHEMA.with_metadata({k: str(v) for k, v in metadata.items()})
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._seq = 0
        self._failed: OutputError | None = None
        self.committed_rows = 0
        self.committed_parts: list[str] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
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
            name = f"{PART_PREFIX}{self._run_id}-{self._seq:05d}.parquet"
            self._seq += 1
            try:
                write_part(self._output, name, part.cast(self._schema))
            except OutputError as e:
                self._failed = e
                raise
            self._buffer = [rest] if rest.num_rows else []
            self._buffered = rest.num_rows
            self.committed_rows += part.num_rows
            self.committed_parts.append(name)


def write_part(output: str, name: str, table: pa.Table) -> None:
    """Readers never see half a part: locally atomic.write_file (temp name, fsync, rename);
    on S3: the complete file is uploaded as one object under its final key (atomic there)."""
    _write_atomically(output, name, lambda f: pq.write_table(table, f, compression="zstd"))


def write_json(directory: str, name: str, obj) -> None:
    """A small JSON file (marker, manifest), replaced atomically and durably."""
    data = json.dumps(obj, indent=2, default=str).encode()
    _write_atomically(directory, name, lambda f: f.write(data))


def _write_atomically(directory: str, name: str, write) -> None:
    if storage.is_s3(directory):
        _put_object(storage.join(directory, name), write)
        return
    final = os.path.join(directory, name)
    try:
        atomic.write_file(final, write)
    except OSError as e:
        raise OutputError(f"cannot write {final}: {e.strerror or e}") from e


def _put_object(uri: str, write) -> None:
    sink = pa.BufferOutputStream()
    write(sink)
    try:
        storage.put_bytes(uri, sink.getvalue().to_pybytes())
    except OSError as e:
        raise OutputError(str(e)) from e


def fsync_dir(path: str) -> None:
    if not storage.is_s3(path):  # nothing to sync on S3: a PUT is durable when it returns
        atomic.fsync_dir(path)
