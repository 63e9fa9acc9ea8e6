"""Which engine compacts an OUTPUT larger than memory: the latest row per (image_id, model)
(newest labeled_at, a tie to the later row in part-name order), sorted by image_id, written as
Parquet. Each engine runs in its own child process; wall, CPU and peak RSS (os.wait4) side by
side on the same synthesized OUTPUT.

    python scripts/bench_engines.py [--rows 2000000] [--engines duckdb,duckdb-arrow,pyarrow,polars]

polars is not a dependency of the project: `pip install --target DIR polars` and pass
`--polars-path DIR` to measure it. Results: bench-results/bench_engines.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MEMORY = os.environ.get('BENCH_MEMORY', '1GB')
DUCKDB_QUERY = """
SELECT * EXCLUDE (filename, file_row_number) FROM read_parquet({files}, union_by_name = true,
  filename = true, file_row_number = true)
QUALIFY row_number() OVER (PARTITION BY image_id, model
                           ORDER BY labeled_at DESC, filename DESC, file_row_number DESC) = 1
ORDER BY model, image_id"""

ENGINES = {
    # DuckDB's own Parquet reader (local files; S3 would need its httpfs extension)
    "duckdb": """
import duckdb, glob, pyarrow.parquet as pq
files = sorted(glob.glob(OUT + '/part-*.parquet'))
con = duckdb.connect(config={'memory_limit': MEMORY, 'threads': 2, 'temp_directory': TMP,
                             'preserve_insertion_order': False})
reader = con.sql(QUERY.format(files=files)).fetch_record_batch(65536)
write(reader)
""",
    # DuckDB fed by pyarrow's reader through an Arrow stream (works on any pyarrow.fs)
    "duckdb-arrow": """
import duckdb, glob
stream = tagged_stream(sorted(glob.glob(OUT + '/part-*.parquet')))
con = duckdb.connect(config={'memory_limit': MEMORY, 'threads': 2, 'temp_directory': TMP,
                             'preserve_insertion_order': False})
reader = con.sql('''SELECT * EXCLUDE (_file, _row) FROM stream
QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC, _file DESC, _row DESC) = 1
ORDER BY model, image_id''').fetch_record_batch(65536)
write(reader)
""",
    # one external sort (DuckDB) of the rows by key, newest last; the last of each key kept
    # while the sorted stream is written (vectorized, a batch at a time)
    "duckdb-sort": """
import duckdb, glob, pyarrow as pa, pyarrow.compute as pc
stream = tagged_stream(sorted(glob.glob(OUT + '/part-*.parquet')))
con = duckdb.connect(config={'memory_limit': MEMORY, 'threads': 2, 'temp_directory': TMP,
                             'preserve_insertion_order': True})
reader = con.sql('SELECT * FROM stream ORDER BY model, image_id, labeled_at, _file, _row').fetch_record_batch(65536)
def last_of_each_key(reader):
    held = None
    for b in reader:
        if held is not None:
            b = pa.concat_batches([held, b])
        if b.num_rows == 0:
            continue
        ids, models = b.column('image_id'), b.column('model')
        same = pc.and_(pc.equal(ids.slice(0, len(ids) - 1), ids.slice(1)),
                       pc.equal(models.slice(0, len(ids) - 1), models.slice(1)))
        keep = pc.invert(same)
        out = b.slice(0, b.num_rows - 1).filter(keep)
        held = b.slice(b.num_rows - 1)
        yield out.drop_columns(['_file', '_row'])
    if held is not None:
        yield held.drop_columns(['_file', '_row'])
write(last_of_each_key(reader))
""",
    # what `pipeline compact` did before: every row in one Arrow table
    "pyarrow": """
import glob, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from pipeline.store.latest import latest_rows
files = sorted(glob.glob(OUT + '/part-*.parquet'))
table = pa.concat_tables([pq.read_table(f).replace_schema_metadata() for f in files])
kept = table.take(np.sort(latest_rows(table).to_numpy()))
write(kept.sort_by([('model', 'ascending'), ('image_id', 'ascending')]).to_reader(65536))
""",
    # Polars' streaming engine: row index in part order, sort, keep the last of each key
    "polars": """
import glob, polars as pl, pyarrow.parquet as pq
files = sorted(glob.glob(OUT + '/part-*.parquet'))
lf = pl.scan_parquet(files).with_row_index('_r')
lf = lf.sort(['model', 'image_id', 'labeled_at', '_r']).unique(
    ['image_id', 'model'], keep='last', maintain_order=True).drop('_r')
lf.sink_parquet(DEST, row_group_size=131072, compression='zstd', engine='streaming')
""",
}

PRELUDE = """
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
OUT, DEST, TMP, MEMORY, QUERY = sys.argv[1:6]
def tagged_stream(files):
    # every row of the parts with its part index and row index, one batch at a time
    schema = pq.read_schema(files[0]).remove_metadata()
    schema = schema.append(pa.field('_file', pa.int32())).append(pa.field('_row', pa.int64()))
    def batches():
        for i, f in enumerate(files):
            row = 0
            for b in pq.ParquetFile(f).iter_batches(65536):
                n = b.num_rows
                yield pa.RecordBatch.from_arrays(
                    [*b.columns, pa.array(np.full(n, i, np.int32)), pa.array(np.arange(row, row + n))],
                    schema=schema)
                row += n
    return pa.RecordBatchReader.from_batches(schema, batches())
def write(reader):
    w = None
    for b in reader:
        if w is None:
            w = pq.ParquetWriter(DEST, b.schema, compression='zstd')
        w.write_batch(b, row_group_size=131072)
    w.close()
"""


def main() -> int:
    args = parse_args()
    from bench_scale import machine, run_measured
    from output_synth import write_output

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-engines-"))
    output = work / "out"
    if not (output / ".synthesized").exists():
        shutil.rmtree(output, ignore_errors=True)
        write_output(output, args.rows)
        (output / ".synthesized").touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([args.polars_path] if args.polars_path else []))}
    results = {"rows": args.rows, "memory_limit": MEMORY, "machine": machine(), "engines": {}}
    for engine in args.engines:
        dest, tmp = work / f"{engine}.parquet", work / f"tmp-{engine}"
        tmp.mkdir(exist_ok=True)
        code, wall, rss, _, err, cpu = run_measured(
            [sys.executable, "-c", PRELUDE + ENGINES[engine], str(output), str(dest), str(tmp),
             MEMORY, DUCKDB_QUERY], env)
        row = {"exit": code, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
               "peak_rss_mb": round(rss / 2**20)}
        if code == 0:
            import pyarrow.parquet as pq
            row["rows_out"] = pq.ParquetFile(dest).metadata.num_rows
        else:
            row["error"] = err.strip().splitlines()[-1:]
        results["engines"][engine] = row
        print(engine, json.dumps(row), flush=True)
        dest.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["when"] = dt.datetime.now(dt.timezone.utc).isoformat()
    out = ROOT / "bench-results" / "bench_engines.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES))
    p.add_argument("--polars-path", help="a folder with polars installed (pip install --target)")
    p.add_argument("--keep", help="work in this folder and keep it (the OUTPUT is reused)")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
