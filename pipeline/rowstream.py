"""OUTPUT's rows as one Arrow stream, and the latest-row rule applied to it in bounded memory.

Parts are read with pyarrow (local paths or S3 through pyarrow.fs: no DuckDB extension), a
record batch at a time, conformed to one schema and tagged with their part's index in name
order (`_file`) and the row's index in its part (`_row`). An external sort orders that stream
by key (latest_sorted: buckets of the image_id range spilled to Arrow files, each sorted in
memory); the last row of each (image_id, model) in that order is the latest: newest
labeled_at, on a tie the later row (later part name, later in its part), the rule of
`store.latest.latest_rows`, streamed. No TensorFlow is imported.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .store import Store
from .store.parts import check_part, open_part
from .store.schema import EMBEDDING, EMBEDDING_TYPE, SCHEMA

FILE, ROW = "_file", "_row"
KEY = ("image_id", "model")
BATCH_ROWS = 65_536
BATCH_BYTES = 16 * 2**20
# DuckDB's memory before it spills to disk (the report's table of current rows and its queries).
MEMORY_LIMIT = os.environ.get("PIPELINE_DUCKDB_MEMORY", "256MB")
# The rows the sort of compact, `latest_batches` and the report holds at once (Arrow bytes,
# estimated as the files' uncompressed Parquet bytes times ARROW_PER_PARQUET_BYTE). Peak RSS is
# about twice this plus ~450 MB (Python, Arrow buffers, the writer's row group).
SORT_MEMORY = int(os.environ.get("PIPELINE_SORT_MEMORY_MB", "32")) * 2**20
ARROW_PER_PARQUET_BYTE = 2  # dictionary-encoded strings (model, run_id, labels) expand
SAMPLE_ROWS = 100_000
# Open bucket files at most (under the usual 1024 open files): past ~30 GB of rows (~500M rows
# without embeddings) buckets grow instead, and with them memory.
MAX_BUCKETS = 900


def common_schema(output: Store, files: Sequence[str]) -> pa.Schema:
    """SCHEMA's columns (those a part lacks read as null: content_sha256 of older parts), then
    the embedding column if any part has one: a fixed-size list if every part has the same
    width, else a variable-size one."""
    schemas = []
    for f in files:
        with contextlib.closing(check_part(output, f)) as part:
            schemas.append(part.schema_arrow.remove_metadata())
    widths = {s.field(EMBEDDING).type for s in schemas if EMBEDDING in s.names}
    schemas = [s.remove(s.get_field_index(EMBEDDING)) if EMBEDDING in s.names else s
               for s in schemas]
    unified = pa.unify_schemas([SCHEMA, *schemas], promote_options="permissive")
    names = SCHEMA.names + [n for n in unified.names if n not in SCHEMA.names]
    schema = pa.schema([unified.field(n) for n in names])
    if widths:
        kind = widths.pop() if len(widths) == 1 else pa.list_(EMBEDDING_TYPE)
        schema = schema.append(pa.field(EMBEDDING, kind))
    return schema


def _engine_column(column: pa.Array, field: pa.Field) -> pa.Array:
    column = column.cast(field.type)
    return as_engine_column(column) if field.name == EMBEDDING else column


def as_engine_column(column: pa.Array) -> pa.Array:
    """An embedding (float16, which DuckDB has no type for) as the bytes of its values."""
    valid = column.is_valid()
    width = 2 * pc.list_value_length(column).fill_null(0).cast(pa.int64()).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(width)]).astype(np.int64)
    values = column.flatten() if column.null_count == 0 else pc.list_flatten(column)
    data = values.buffers()[1][values.offset * 2:(values.offset + len(values)) * 2]
    blobs = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(column),
                                            [None, pa.py_buffer(offsets), data])
    return pc.if_else(valid, blobs, pa.scalar(None, pa.large_binary()))


def as_embedding(blobs: pa.Array, kind: pa.DataType) -> pa.Array:
    """The inverse of as_engine_column, as a column of type `kind`."""
    blobs = blobs.cast(pa.large_binary())
    valid = blobs.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(kind):
        filler = pa.scalar(b"\0" * (2 * kind.list_size), pa.large_binary())
        blobs = pc.if_else(blobs.is_valid(), blobs, filler)
    offsets = np.frombuffer(blobs.buffers()[1], np.int64)[blobs.offset:blobs.offset + len(blobs) + 1]
    data = blobs.buffers()[2]
    values = pa.Array.from_buffers(EMBEDDING_TYPE, int(offsets[-1] - offsets[0]) // 2,
                                   [None, data[offsets[0]:offsets[-1]]])
    if pa.types.is_fixed_size_list(kind):
        return pa.FixedSizeListArray.from_arrays(values, kind.list_size, mask=pa.array(~valid))
    lists = pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 2, pa.int32()), values,
                                     mask=pa.array(~valid))
    return lists.cast(kind)


def part_batches(output: Store, files: Sequence[str], schema: pa.Schema,
                 columns: Sequence[str], tags: Sequence[int] | None = None) -> pa.RecordBatchReader:
    """`columns` of every row of OUTPUT's data files `files` (in that order), plus `_file` (the
    file's index, or `tags[index]`) and `_row`; an embedding as bytes (as_engine_column)."""
    wanted = pa.schema([schema.field(c) for c in columns])
    out = pa.schema([f.with_type(pa.large_binary()) if f.name == EMBEDDING else f for f in wanted])
    out = out.append(pa.field(FILE, pa.int32())).append(pa.field(ROW, pa.int64()))

    def read(files: Sequence[str]) -> Iterator[pa.RecordBatch]:
        for index, path in enumerate(files):
            tag = index if tags is None else tags[index]
            with open_part(output, path) as part:
                present = [c for c in columns if c in part.schema_arrow.names]
                row = 0
                size = batch_rows(part.metadata, present)
                for batch in part.iter_batches(size, columns=present, use_threads=False):
                    n = batch.num_rows
                    arrays = [_engine_column(batch.column(c), wanted.field(c))
                              if c in present else pa.nulls(n, out.field(c).type) for c in columns]
                    yield pa.RecordBatch.from_arrays(
                        [*arrays, pa.array(np.full(n, tag, np.int32)),
                         pa.array(np.arange(row, row + n, dtype=np.int64))], schema=out)
                    row += n

    return tracked(out, read(files))


def batch_rows(md, columns: Sequence[str]) -> int:
    """Rows per read batch: BATCH_ROWS, fewer where that is more than about BATCH_BYTES
    (uncompressed; a compacted file's 65k rows with embeddings are 170 MB)."""
    stored = uncompressed_bytes(md, columns)
    return min(BATCH_ROWS, max(1024, BATCH_BYTES * max(1, md.num_rows) // max(1, stored)))


def uncompressed_bytes(md, columns: Sequence[str]) -> int:
    """The uncompressed Parquet bytes of `columns` in a file (its footer `md`)."""
    leaves = [c for c in range(md.num_columns) if md.schema.column(c).path.split(".")[0] in columns]
    return sum(md.row_group(g).column(c).total_uncompressed_size
               for g in range(md.num_row_groups) for c in leaves)


# What a tracked reader raised inside DuckDB, by the reader's id: re-raised as it was
_failures: dict[int, BaseException] = {}


def tracked(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> pa.RecordBatchReader:
    """A reader for DuckDB to scan whose exceptions (a CorruptPart, an S3 error, an interrupt)
    raising_what_the_parts_raised re-raises as they were, not as DuckDB's own error."""
    def recorded() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except BaseException as e:
            _failures[id(reader)] = e
            raise

    reader = pa.RecordBatchReader.from_batches(schema, recorded())
    return reader


@contextlib.contextmanager
def duckdb_connection(database: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection (in memory, or a database file in `database`'s folder) that spills
    to a private temp folder, removed afterwards with everything in it."""
    spill = tempfile.mkdtemp(prefix="pipeline-duckdb-")
    con = duckdb.connect(os.path.join(spill, database) if database else ":memory:", config={
        "memory_limit": MEMORY_LIMIT, "temp_directory": spill,
        "threads": min(4, os.cpu_count() or 1)})
    try:
        yield quiet(con)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No progress bar on stdout (a session setting: every cursor needs it)."""
    con.execute("SET enable_progress_bar = false")
    return con


def latest_sorted(output: Store, files: Sequence[str], schema: pa.Schema,
                  columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The latest row of each (image_id, model) of `files` (`columns`, which must hold KEY and
    labeled_at, as part_batches gives them), in (image_id, model) order, still with `_file` and
    `_row`. An external distribution sort, not DuckDB's ORDER BY: DuckDB 2.0's sort fails
    ("failed to pin block") once its input passes about its memory limit with wide rows (an
    embedding), and narrow rows need a limit that grows with the input's square root (256 MB
    failed on 55M rows of ours; docs/scale.md), however much it may spill. Here a first
    pass samples image_id and cuts the key range into buckets of about SORT_MEMORY; the second
    spills each row to its bucket's Arrow file (TMPDIR); each bucket is then sorted alone in
    memory (Arrow kernels), so memory does not grow with the number of rows."""
    bounds, buckets = bucket_bounds(output, files, columns)
    rows = part_batches(output, files, schema, columns)
    if buckets == 1:
        yield from last_of_each_key(_sorted_bucket(pa.Table.from_batches(list(rows), rows.schema)))
        return
    spill = tempfile.mkdtemp(prefix="pipeline-sort-")
    try:
        paths = _distribute(rows, bounds, spill)
        yield from last_of_each_key(_sorted_buckets(paths))
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def bucket_bounds(output: Store, files: Sequence[str],
                  columns: Sequence[str]) -> tuple[np.ndarray, int]:
    """Sorted image_ids that cut the rows into buckets of about SORT_MEMORY (estimated from the
    files' uncompressed sizes), from a strided sample of at most 2 * SAMPLE_ROWS image_ids."""
    sample: list[pa.Array] = []
    sampled = rows = stored = 0
    step = 1
    for path in files:
        with open_part(output, path) as part:
            stored += uncompressed_bytes(part.metadata, columns)
            ids = part.read(columns=["image_id"], use_threads=False).column("image_id")
        ids = ids.combine_chunks().drop_null()
        start = (-rows) % step
        sample.append(ids.take(pa.array(np.arange(start, len(ids), step))))
        rows += len(ids)
        sampled += len(sample[-1])
        if sampled > 2 * SAMPLE_ROWS:  # keep every other one: the stride doubles
            kept = pa.concat_arrays(sample)
            sample, step = [kept.take(pa.array(np.arange(0, len(kept), 2)))], step * 2
            sampled = len(sample[0])
    buckets = min(MAX_BUCKETS, max(1, math.ceil(stored * ARROW_PER_PARQUET_BYTE / SORT_MEMORY)))
    if buckets == 1 or not sample:
        return np.array([], object), 1
    ids = pa.concat_arrays(sample).sort().to_numpy(zero_copy_only=False)
    bounds = np.unique(ids[[len(ids) * b // buckets for b in range(1, buckets)]])
    return bounds, len(bounds) + 1


def _distribute(rows: pa.RecordBatchReader, bounds: np.ndarray, spill: str) -> list[str]:
    """Each row into the Arrow file of its bucket (image_id between two bounds; a null id in
    the last). Returns the buckets' paths in key order."""
    paths = [os.path.join(spill, f"bucket-{b:06d}.arrow") for b in range(len(bounds) + 1)]
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for batch in rows:
            for bucket, part in _split(batch, bounds):
                if bucket not in writers:
                    writers[bucket] = pa.ipc.new_file(paths[bucket], batch.schema)
                writers[bucket].write_batch(part)
    finally:
        for writer in writers.values():
            writer.close()
    return [p for b, p in enumerate(paths) if b in writers]


def _split(batch: pa.RecordBatch, bounds: np.ndarray) -> Iterator[tuple[int, pa.RecordBatch]]:
    ids = batch.column("image_id")
    low, high = pc.min_max(ids).values()
    if ids.null_count == 0 and low.is_valid and (
            np.searchsorted(bounds, low.as_py(), "right")
            == np.searchsorted(bounds, high.as_py(), "right")):
        yield int(np.searchsorted(bounds, low.as_py(), "right")), batch  # one bucket: no search
        return
    bucket = np.full(len(ids), len(bounds), np.int64)
    valid = ids.is_valid().to_numpy(zero_copy_only=False)
    bucket[valid] = np.searchsorted(bounds, ids.filter(valid).to_numpy(zero_copy_only=False),
                                    "right")
    order = np.argsort(bucket, kind="stable")
    edges = np.flatnonzero(np.diff(bucket[order])) + 1
    for piece in np.split(order, edges):
        yield int(bucket[piece[0]]), batch.take(pa.array(piece))


def _sorted_buckets(paths: Sequence[str]) -> Iterator[pa.RecordBatch]:
    for path in paths:
        yield from _sorted_bucket(_read_bucket(path))  # the last bucket is freed before


def _read_bucket(path: str) -> pa.Table:
    with pa.OSFile(path) as f:
        table = pa.ipc.open_file(f).read_all()
    os.remove(path)
    return table


def _sorted_bucket(table: pa.Table) -> Iterator[pa.RecordBatch]:
    """A bucket's rows by (image_id, model, labeled_at, _file, _row), in batches of at most
    BATCH_ROWS rows and about BATCH_BYTES (65k rows with embeddings would be 170 MB)."""
    table = table.combine_chunks()
    order = pc.sort_indices(table, [(c, "ascending", "at_end")
                                    for c in (*KEY, "labeled_at", FILE, ROW)])
    step = max(1, min(BATCH_ROWS, BATCH_BYTES * max(1, len(order)) // max(1, table.nbytes)))
    for start in range(0, len(order), step):
        yield from table.take(order.slice(start, step)).combine_chunks().to_batches()


@contextlib.contextmanager
def raising_what_the_parts_raised(rows: pa.RecordBatchReader) -> Iterator[None]:
    """A CorruptPart, an S3 error or an interrupt while DuckDB read `rows`, as it was raised."""
    try:
        yield
    except duckdb.Error:
        failure = _failures.pop(id(rows), None)
        if failure is not None:
            raise failure from None
        raise
    finally:
        _failures.pop(id(rows), None)


def last_of_each_key(sorted_rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Keep a row when the next one has another key (the stream is sorted by key). The last
    row of a batch waits for the next batch."""
    held = None
    for batch in sorted_rows:
        if held is not None:
            batch = pa.Table.from_batches([held, batch]).combine_chunks().to_batches()[0]
        if batch.num_rows == 0:
            continue
        n = batch.num_rows
        same = None
        for name in KEY:
            column = batch.column(name)
            equal = pc.equal(column.slice(0, n - 1), column.slice(1))
            same = equal if same is None else pc.and_(same, equal)
        yield batch.slice(0, n - 1).filter(pc.invert(same))
        held = batch.slice(n - 1)
    if held is not None:
        yield held


def without_tags(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield batch.drop_columns([FILE, ROW])
