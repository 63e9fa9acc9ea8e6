"""Reading an OUTPUT as an analyst: the current row of every image and model.

OUTPUT keeps history: a changed file relabeled, a retried error that later succeeded, an
--overwrite that has not completed, a second model, each add rows next to the earlier ones.
The current row of each (image_id, model) is its latest: newest labeled_at, on a tie the later
row, the rule of `pipeline compact` and of the README's DuckDB query. Both functions stream the
parts through an external sort (rowstream), so the rows are never all in memory while
they are picked. No TensorFlow is imported.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import pyarrow as pa

from . import rowstream, store
from .store.schema import EMBEDDING, SCHEMA
from .types import S3Options


def latest_batches(output: str, columns: Sequence[str] | None = None,
                   s3: S3Options = S3Options()) -> pa.RecordBatchReader:
    """OUTPUT's current rows as a pyarrow RecordBatchReader, in (image_id, model) order, in
    bounded memory (the sort spills to a temp folder): for outputs of any size.

    `columns` selects columns (all of the output contract by default; `embedding`, if any part
    has one, as a variable-size list). `s3`: how to reach an s3:// OUTPUT."""
    out = store.open_output(output, s3)
    files = [f.name for f in out.data_files()]
    schema = rowstream.common_schema(out, files)
    wanted = list(columns) if columns is not None else schema.names
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise KeyError(f"no column {', '.join(unknown)} in {output}")
    needed = list(dict.fromkeys([*wanted, *rowstream.KEY, "labeled_at"]))
    shape = pa.schema([schema.field(c) for c in wanted])

    def batches() -> Iterator[pa.RecordBatch]:
        if not files:
            return
        for batch in rowstream.latest_sorted(out, files, schema, needed):
            yield pa.RecordBatch.from_arrays(
                [rowstream.as_embedding(batch.column(c), shape.field(c).type)
                 if c == EMBEDDING else batch.column(c) for c in wanted], schema=shape)

    return pa.RecordBatchReader.from_batches(shape, batches())


def latest(output: str, columns: Sequence[str] | None = None,
           s3: S3Options = S3Options()) -> pa.Table:
    """OUTPUT's current rows as one pyarrow Table, in (image_id, model) order: simple for
    outputs whose current rows fit in memory (about 1 KB per row with top-5 lists; read fewer
    `columns` to need less). For bigger ones iterate `latest_batches`, or query with DuckDB.
    `.to_pandas(types_mapper=pd.ArrowDtype)` keeps width/height integers where error rows have
    none."""
    table = latest_batches(output, columns, s3).read_all()
    if columns is None and table.num_rows == 0 and not store.open_output(output, s3).data_files():
        return SCHEMA.empty_table()
    return table
