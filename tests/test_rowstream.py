"""The streamed latest-row rule (DuckDB's external sort) against store.latest.latest_rows on the
same parts: newest labeled_at, a tie to the later part name, then the later row; batches cut
keys apart."""
import datetime as dt

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline import rowstream
from pipeline.store.latest import latest_rows
from pipeline.writer import SCHEMA

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def part(path, ids, days, run):
    """Rows in the writer's schema; `days` after T0 as labeled_at; the run_id says which row."""
    n = len(ids)
    columns = {"image_id": pa.array(ids), "uri": pa.array(ids), "status": pa.array(["ok"] * n),
               "file_size": pa.array(np.ones(n, np.int64)),
               "model": pa.array(["m"] * n),
               "run_id": pa.array([f"{run}-{i}" for i in range(n)]),
               "labeled_at": pa.array([T0 + dt.timedelta(days=int(d)) for d in days],
                                      pa.timestamp("us", tz="UTC"))}
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA},
                     schema=SCHEMA)
    pq.write_table(table, path)


def test_latest_batches_picks_what_latest_rows_picks_ties_included(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    for p in range(6):  # 300 ids over 6 parts, labeled_at on few days: ties everywhere
        ids = [f"img{i:03d}" for i in rng.integers(0, 300, 400)]
        part(tmp_path / f"part-r{p}-00000.parquet", ids, rng.integers(0, 3, 400), f"r{p}")
    monkeypatch.setattr(rowstream, "BATCH_ROWS", 7)  # keys cut across batches
    table = pq.read_table(tmp_path, schema=SCHEMA)  # parts in name order, rows in order
    expected = table.take(latest_rows(table)).sort_by("image_id")
    got = pipeline.latest_batches(str(tmp_path), ["image_id", "run_id"]).read_all()
    assert got.column("image_id").to_pylist() == expected.column("image_id").to_pylist()
    assert got.column("run_id").to_pylist() == expected.column("run_id").to_pylist()
    assert len(set(got.column("image_id").to_pylist())) == got.num_rows


@pytest.mark.parametrize("most", [900, 3])
def test_the_latest_rule_holds_across_many_sort_buckets(tmp_path, monkeypatch, most):
    """A sort memory of one byte: a bucket per distinct image_id (or `most` buckets), parts
    spanning them all."""
    rng = np.random.default_rng(5)
    for p in range(6):
        ids = [f"img{i:03d}" for i in rng.integers(0, 300, 400)]
        part(tmp_path / f"part-r{p}-00000.parquet", ids, rng.integers(0, 3, 400), f"r{p}")
    monkeypatch.setattr(rowstream, "SORT_MEMORY", 1)
    monkeypatch.setattr(rowstream, "BATCH_ROWS", 64)
    monkeypatch.setattr(rowstream, "MAX_BUCKETS", most)
    table = pq.read_table(tmp_path, schema=SCHEMA)
    expected = table.take(latest_rows(table)).sort_by("image_id")
    buckets = rowstream.bucket_bounds(pipeline.store.open_output(str(tmp_path)),
                                      sorted(p.name for p in tmp_path.iterdir()), ["image_id"])[1]
    assert buckets > 250 if most > 300 else buckets == most
    got = pipeline.latest_batches(str(tmp_path), ["image_id", "run_id"]).read_all()
    assert got.column("image_id").to_pylist() == expected.column("image_id").to_pylist()
    assert got.column("run_id").to_pylist() == expected.column("run_id").to_pylist()
