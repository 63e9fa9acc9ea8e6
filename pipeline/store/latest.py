"""The latest-row rule: which row answers for an (image_id, model) now.

OUTPUT keeps history (a changed file relabeled, a retried error, a second model...). The row
that counts is the one with the newest `labeled_at`; on a tie, the later row in data-file order
(files by name, rows in file order). `latest_rows` is the rule's one definition in code (the
done set, `pipeline.latest` and `compact` use it); `LATEST_QUALIFY` is its documented twin in
SQL, the clause the docs' DuckDB queries use (tests check that they agree, and that the docs
say it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY = ("image_id", "model")
TIME = "labeled_at"
LATEST_QUALIFY = "QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1"


def latest_rows(table: pa.Table, key: Sequence[str] = KEY, time: str = TIME) -> pa.Array:
    """Indices of the latest row per `key` of `table` (rows in data-file order): newest `time`,
    on a tie the later row. Other key and time columns (the done set's hashes) work alike."""
    order = pc.sort_indices(table, [(time, "ascending")])  # stable: ties keep row order
    ranked = table.select(list(key)).take(order).append_column(
        "_rank", pa.array(np.arange(len(order), dtype=np.int64)))
    last = ranked.group_by(list(key), use_threads=False).aggregate([("_rank", "max")])
    return order.take(last.column("_rank_max"))


def latest_query(source: str) -> str:
    """The current rows of `source` (e.g. "read_parquet('labels/part-*.parquet',
    union_by_name = true)") in DuckDB."""
    return f"SELECT * FROM {source}\n{LATEST_QUALIFY}"
