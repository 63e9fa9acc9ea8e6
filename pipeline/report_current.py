"""The report's view of OUTPUT: its current rows (the columns the page needs, no lists, no
embeddings) in a DuckDB table on disk, and the aggregates and bounded samples the page shows,
each one SQL query. DuckDB keeps at most its memory limit in RAM and spills the rest to a temp
folder, so the report's memory does not grow with the number of rows: totals, histograms and
label counts are streaming aggregates, samples are top-k (a fixed hash order, the lowest
scores, the first rows of each error kind). No TensorFlow is imported.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import pyarrow as pa

from . import rowstream
from .store import Store

SCORE_BINS = 20


class CurrentRows:
    """Query the current rows; `rows` is their count."""

    def __init__(self, con, rows: int):
        self.con, self.rows = con, rows

    def _all(self, sql: str, *params) -> list[tuple]:
        return rowstream.quiet(self.con.cursor()).execute(sql, list(params)).fetchall()

    def models_by_size(self) -> list[str]:
        return [m for m, _ in self._all(
            "SELECT model, count(*) AS n FROM cur GROUP BY model ORDER BY n DESC, model")]

    def status_counts(self) -> dict[tuple, int]:
        return {(m, s): n for m, s, n in self._all(
            "SELECT model, status, count(*) FROM cur GROUP BY ALL")}

    def kind_counts(self) -> dict[tuple, int]:
        return {(m, k): n for m, k, n in self._all(
            "SELECT model, error_kind, count(*) FROM cur WHERE status = 'error' GROUP BY ALL")}

    def label_counts(self, model: str) -> list[tuple[str, int]]:
        """Every label of the model's ok rows with its count, most frequent first."""
        return [(label, n) for label, n in self._all(
            "SELECT coalesce(label, '?') AS l, count(*) AS n FROM cur WHERE model = ? AND "
            "status = 'ok' GROUP BY l ORDER BY n DESC, l", model)]

    def score_bins(self, model: str) -> tuple[int, ...]:
        """np.histogram's bins over [0, 1] (the last one closed; a missing score counts as 0)."""
        counts = dict(self._all(
            f"SELECT least({SCORE_BINS - 1}, greatest(0, floor(coalesce(score, 0) * {SCORE_BINS})"
            f"))::INT AS b, count(*) FROM cur WHERE model = ? AND status = 'ok' GROUP BY b", model))
        return tuple(int(counts.get(b, 0)) for b in range(SCORE_BINS))

    def label_samples(self, model: str, labels: Sequence[str], most: int) -> dict[str, list[dict]]:
        """Up to `most` ok rows of each label, the first in a fixed hash order of image_id
        (the same OUTPUT gives the same samples), best score first."""
        if not labels or most == 0:
            return {}
        found = self._all(
            "SELECT coalesce(label, '?') AS l, arg_min({'image_id': image_id, 'uri': uri, "
            "'score': score}, hash(image_id), ?) FROM cur WHERE model = ? AND status = 'ok' "
            "AND coalesce(label, '?') IN (SELECT unnest(?)) GROUP BY l", most, model, list(labels))
        return {label: sorted(rows, key=lambda r: -(r["score"] or 0.0)) for label, rows in found}

    def lowest_scores(self, model: str, most: int) -> list[dict]:
        return self._dicts(
            "SELECT image_id, uri, score, label FROM cur WHERE model = ? AND status = 'ok' "
            "ORDER BY coalesce(score, 0), image_id LIMIT ?", model, most)

    def error_kinds(self, examples: int) -> list[tuple[str, int, list[dict]]]:
        """(kind, count, the first `examples` rows in image_id order) per error kind."""
        return [(kind, n, rows) for kind, n, rows in self._all(
            "SELECT coalesce(error_kind, '?') AS k, count(*) AS n, arg_min({'image_id': "
            "image_id, 'model': model, 'uri': uri, 'error': error}, (image_id, model), ?) "
            "FROM cur WHERE status = 'error' GROUP BY k ORDER BY n DESC, k", max(examples, 1))]

    def duplicate_hashes(self, most: int) -> tuple[int, int, list[tuple[str, int]]]:
        """(groups, images in them, the `most` biggest groups) of byte-identical images."""
        rowstream.quiet(self.con.cursor()).execute(
            "CREATE OR REPLACE TABLE dup AS SELECT content_sha256 AS h, "
            "count(DISTINCT image_id) AS n FROM cur WHERE content_sha256 IS NOT NULL GROUP BY h "
            "HAVING count(DISTINCT image_id) > 1")
        (groups, images), = self._all("SELECT count(*), coalesce(sum(n), 0) FROM dup")
        top = self._all("SELECT h, n FROM dup ORDER BY n DESC, h LIMIT ?", most)
        return int(groups), int(images), [(h, int(n)) for h, n in top]

    def hash_members(self, hashes: Sequence[str]) -> list[dict]:
        return self._dicts(
            "SELECT content_sha256, image_id, uri, label FROM cur WHERE content_sha256 IN "
            "(SELECT unnest(?)) ORDER BY content_sha256, image_id", list(hashes))

    def current_ok(self, rows: pa.Table, model: str) -> pa.Table:
        """The rows of `rows` (read from a part) that are current ok rows of `model`."""
        index = rows.select(["image_id", "labeled_at"]).append_column(
            "row", pa.array(range(rows.num_rows), pa.int64()))
        con = rowstream.quiet(self.con.cursor())
        con.register("part_rows", index)
        picked = con.execute(
            "SELECT p.row FROM part_rows p JOIN cur c ON p.image_id = c.image_id AND "
            "p.labeled_at = c.labeled_at WHERE c.model = ? AND c.status = 'ok' ORDER BY p.row",
            [model]).fetchall()
        con.close()
        return rows.take(pa.array([r for r, in picked], pa.int64()))

    def _dicts(self, sql: str, *params) -> list[dict]:
        cursor = rowstream.quiet(self.con.cursor()).execute(sql, list(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]


@contextlib.contextmanager
def current_rows(output: Store, files: Sequence[str],
                 columns: Sequence[str]) -> Iterator[CurrentRows]:
    """The current rows of OUTPUT's data files `files` (the `columns`, plus the key) in a
    DuckDB table in a temp folder, removed afterwards."""
    with rowstream.duckdb_connection("current.duckdb") as con:
        schema = rowstream.common_schema(output, files)
        wanted = [c for c in dict.fromkeys([*rowstream.KEY, "labeled_at", *columns])]
        out = pa.schema([schema.field(c) for c in wanted])
        if files:
            sorted_rows = rowstream.latest_sorted(output, files, schema, wanted)
            stream = rowstream.tracked(out, (b.select(wanted) for b in sorted_rows))
        else:
            stream = out.empty_table().to_reader()
        con.register("current_in", stream)
        with rowstream.raising_what_the_parts_raised(stream):
            con.execute("CREATE TABLE cur AS SELECT * FROM current_in")
        con.unregister("current_in")
        (rows,), = con.execute("SELECT count(*) FROM cur").fetchall()
        yield CurrentRows(con, int(rows))
