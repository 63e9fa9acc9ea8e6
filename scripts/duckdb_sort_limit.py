"""Does DuckDB's ORDER BY finish under a memory limit? (why rowstream sorts in buckets itself)

    python scripts/duckdb_sort_limit.py ROWS PAYLOAD_BYTES LIMIT [THREADS] [SETTING=VALUE ...]

sorts ROWS rows of (hash(i)::VARCHAR, i[, a PAYLOAD_BYTES blob]) from range(ROWS) by the
first column, spilling to TMPDIR, reads the result through as Arrow batches and prints "ok"
or DuckDB's error. DuckDB 2.0.1, 2 threads: `200000 2560 256MB` and `10000000 0 64MB` fail
("failed to pin block"); `80000 2560 256MB` and `5000000 0 64MB` finish.
"""
from __future__ import annotations

import sys
import tempfile
import time

import duckdb


def main() -> int:
    rows, payload, limit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    with tempfile.TemporaryDirectory(prefix="duckdb-sort-") as spill:
        con = duckdb.connect(":memory:", config={"memory_limit": limit, "threads": threads,
                                                  "temp_directory": spill})
        con.execute("SET enable_progress_bar = false")
        for setting in sys.argv[5:]:
            con.execute(f"SET {setting}")
        blob = f", repeat(chr(65 + (i % 26)::INT), {payload})::BLOB AS b" if payload else ""
        sql = f"SELECT hash(i)::VARCHAR AS k, i{blob} FROM range({rows}) t(i) ORDER BY k"
        start = time.time()
        try:
            n = sum(b.num_rows for b in con.sql(sql).to_arrow_reader(65536))
        except duckdb.Error as e:
            print("failed:", str(e).splitlines()[0])
            return 1
        print(f"ok: {n} rows in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
