"""Reading an OUTPUT as an analyst: the current row of every image and model.

OUTPUT keeps history: a changed file relabeled, a retried error that later succeeded, an
--overwrite that has not completed, a second model, each add rows next to the earlier ones.
`latest` keeps the row that answers for each (image_id, model) now, by the same rule as
`pipeline compact` and the README's DuckDB query. No TensorFlow is imported.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pyarrow as pa

from . import store
from .store.latest import latest_rows
from .store.parts import check_part, reading_part
from .store.schema import SCHEMA
from .types import S3Options


def latest(output: str, columns: Sequence[str] | None = None,
           s3: S3Options = S3Options()) -> pa.Table:
    """A pyarrow Table of OUTPUT's current rows, one per (image_id, model), in image_id order.

    `columns` selects columns (all of the output contract by default). Holds OUTPUT's rows in
    memory while it picks (about 1 KB per row with top-5 lists); for very large outputs use the
    DuckDB query in the README, which streams. `.to_pandas(types_mapper=pd.ArrowDtype)` keeps
    width/height integers where error rows have none. `s3`: how to reach an s3:// OUTPUT.
    """
    out = store.open_output(output, s3)
    files = [f.name for f in out.data_files()]
    schemas = []
    for f in files:
        with contextlib.closing(check_part(out, f)) as part:
            schemas.append(part.schema_arrow.remove_metadata())
    schema = _common_schema(schemas)
    wanted = list(columns) if columns is not None else schema.names
    if not files:
        return SCHEMA.empty_table().select(wanted)
    needed = list(dict.fromkeys([*wanted, "image_id", "model", "labeled_at"]))
    with reading_part(f"a part in {output}"):
        table = out.dataset(files, schema=schema).to_table(columns=needed)
    rows = latest_rows(table)
    # No history (each image labeled once): every row is current, no copy needed
    current = table if len(rows) == table.num_rows else table.take(np.sort(rows.to_numpy()))
    return current.sort_by([("image_id", "ascending"), ("model", "ascending")]).select(wanted)


def _common_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """SCHEMA's columns (those a part lacks read as null: content_sha256 of older parts), then
    the embedding column if any part has one."""
    unified = pa.unify_schemas([SCHEMA, *schemas], promote_options="permissive")
    names = SCHEMA.names + [n for n in unified.names if n not in SCHEMA.names]
    return pa.schema([unified.field(n) for n in names])
