"""OUTPUT's rows as one Arrow stream, and the latest-row rule applied to it in bounded memory.

Parts are read with pyarrow (local paths or S3 through pyarrow.fs: no DuckDB extension), a
record batch at a time, conformed to one schema and tagged with their part's index in name
order (`_file`) and the row's index in its part (`_row`). DuckDB sorts that stream by key,
spilling to disk past its memory limit; the last row of each (image_id, model) in that order
is the latest: newest labeled_at, on a tie the later row (later part name, later in its part),
the rule of `store.latest.latest_rows`, streamed. No TensorFlow is imported.
"""
from __future__ import annotations

import contextlib
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
# DuckDB's memory before it spills to disk: the sort of compact, `latest_batches` and the
# report. Peak RSS is about this plus ~450 MB (Python, Arrow buffers, the writer's row group).
MEMORY_LIMIT = os.environ.get("PIPELINE_DUCKDB_MEMORY", "256MB")


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
                for batch in part.iter_batches(BATCH_ROWS, columns=present, use_threads=False):
                    n = batch.num_rows
                    arrays = [_engine_column(batch.column(c), wanted.field(c))
                              if c in present else pa.nulls(n, out.field(c).type) for c in columns]
                    yield pa.RecordBatch.from_arrays(
                        [*arrays, pa.array(np.full(n, tag, np.int32)),
                         pa.array(np.arange(row, row + n, dtype=np.int64))], schema=out)
                    row += n

    return tracked(out, read(files))


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


def latest_sorted(con, rows: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The latest row of each (image_id, model) of `rows` (from part_batches), in (image_id,
    model) order, still with `_file` and `_row`."""
    sort = ", ".join([*KEY, "labeled_at", FILE, ROW])
    quiet(con).register("output_rows", rows)
    with raising_what_the_parts_raised(rows):
        result = con.sql(f"SELECT * FROM output_rows ORDER BY {sort}").to_arrow_reader(BATCH_ROWS)
        yield from last_of_each_key(result)
    con.unregister("output_rows")


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
