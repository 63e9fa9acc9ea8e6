"""`make bench-output`: what analysts' commands cost on a big OUTPUT, before and after compaction.

For each N it synthesizes an OUTPUT of N current images in the writer's schema and file
metadata (4096-row parts, as runs write them) plus 10% superseded history (N/10 of them
labeled again later), without or with a 1280-wide float16 `embedding` (--embedding-sizes).
Then, each in a child process measured with os.wait4 (wall, CPU, peak RSS):
1. the README's current-rows DuckDB query (a GROUP BY label over the current rows);
2. `pipeline compact OUTPUT` (bytes rewritten from its _runs/ record; then the check that
   exactly one row per image and model is left, and the file count);
3. the same query and a one-image lookup, after compaction;
4. `pipeline.latest_batches(OUTPUT)` read through (the current rows, streamed);
5. `pipeline report OUTPUT` (the sources do not exist: every thumbnail is a placeholder);
6. the nightly case: 1,000 new images in a new part, then `pipeline compact` again (bytes
   rewritten as a share of the archive).

    python scripts/bench_output.py [--sizes 500k,2M] [--embedding-sizes 1M] [--work DIR] [--keep]

Results: bench-results/bench_output.json (and a Markdown table on stdout).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scale import image_id, machine, run_measured  # noqa: E402
from output_synth import write_output, write_parts  # noqa: E402

QUERY = """WITH current AS (
  SELECT * FROM read_parquet('{out}/part-*.parquet', union_by_name = true)
  QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1)
SELECT label, count(*) AS n FROM current WHERE status = 'ok' GROUP BY 1 ORDER BY 2 DESC"""
LOOKUP = "SELECT label FROM read_parquet('{out}/part-*.parquet', union_by_name = true) WHERE image_id = '{id}'"
CHECK = """SELECT count(*), count(DISTINCT (image_id, model)), count(DISTINCT filename)
FROM read_parquet('{out}/part-*.parquet', union_by_name = true, filename = true)"""
NIGHTLY = 1000


def main() -> int:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "runs": []}
    cases = [(n, None) for n in args.sizes] + [(n, 1280) for n in args.embedding_sizes]
    for n, width in cases:
        results["runs"].append(bench_one(work, n, width, args.keep))
        print(json.dumps(results["runs"][-1]), flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["when"] = dt.datetime.now(dt.timezone.utc).isoformat()
    out = ROOT / "bench-results" / "bench_output.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results["runs"]))
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=counts, default=counts("1M,10M,50M"))
    p.add_argument("--embedding-sizes", type=counts, default=counts("1M,5M"))
    p.add_argument("--work", default="/tmp/bench-output")
    p.add_argument("--keep", action="store_true", help="keep each synthesized OUTPUT")
    return p.parse_args()


def counts(text: str) -> list[int]:
    scale = {"k": 1_000, "M": 1_000_000}
    return [int(float(t[:-1]) * scale[t[-1]]) if t[-1] in scale else int(t)
            for t in text.split(",") if t]


def measured(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code, wall, rss, out, err, cpu = run_measured(args, env)
    if code != 0:
        raise SystemExit(f"{args[:4]} failed ({code}): {err[-2000:]}")
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "peak_rss_mb": round(rss / 2**20), "stdout": out.strip()[-400:]}


def duckdb_child(sql: str) -> list[str]:
    code = ("import duckdb, sys; con = duckdb.connect(); con.execute('SET enable_progress_bar = false'); "
            "print(con.sql(sys.argv[1]).fetchall()[:3])")
    return [sys.executable, "-c", code, sql]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("part-*.parquet"))


def compaction_record(out: Path) -> dict:
    records = [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]
    return [r for r in records if r.get("kind") == "compact"][-1]


def compact_step(out: Path) -> dict:
    step = measured([sys.executable, "-m", "pipeline", "compact", str(out)])
    record = compaction_record(out)
    step.update({k: record[k] for k in ("files_rewritten", "bytes_rewritten", "bytes_before",
                                        "bytes_written", "parts_before", "parts_after")})
    step["rewritten_share"] = round(record["bytes_rewritten"] / max(1, record["bytes_before"]), 5)
    step.pop("stdout")
    return step


def bench_one(work: Path, n: int, width: int | None, keep: bool) -> dict:
    out = work / f"n{n}{'-emb' if width else ''}"
    shutil.rmtree(out, ignore_errors=True)
    rows = write_output(out, n, embedding_width=width)
    result = {"n": n, "embedding": width, "rows": rows, "loadavg_start": os.getloadavg()[0],
              "files_before": len(list(out.glob("part-*.parquet"))), "bytes": folder_bytes(out)}
    progress = work / f"progress-{out.name}.json"  # each step as it ends (a long N can fail late)

    def step(name: str, value: dict) -> None:
        result[name] = value
        progress.write_text(json.dumps(result, indent=1) + "\n")

    step("query_before", measured(duckdb_child(QUERY.format(out=out))))
    step("compact", compact_step(out))
    total, distinct, files = [int(v) for v in measured(duckdb_child(CHECK.format(out=out)))[
        "stdout"].strip("[]()").split(",")]
    result.update(rows_after=total, one_row_per_key=total == distinct == n, files_after=files)
    step("query_after", measured(duckdb_child(QUERY.format(out=out))))
    some = image_id(np.array([n // 2])).to_pylist()[0]
    step("lookup_after", measured(duckdb_child(LOOKUP.format(out=out, id=some))))
    step("latest_batches", measured([sys.executable, "-c", (
        "import sys, pipeline; print(sum(b.num_rows for b in pipeline.latest_batches(sys.argv[1])))"),
        str(out)]))
    step("report", measured([sys.executable, "-m", "pipeline", "report", str(out), "-o",
                             str(work / "report.html"), "--max-thumbnails", "20"]))
    write_parts(out, np.arange(n, n + NIGHTLY), dt.datetime(2025, 8, 1, tzinfo=dt.timezone.utc),
                "20250801T000000Z-nightly", 4096, width, np.random.default_rng(1))
    step("nightly_compact", compact_step(out))
    result["loadavg_end"] = os.getloadavg()[0]
    for step in ("query_before", "query_after", "lookup_after", "latest_batches", "report"):
        result[step].pop("stdout", None)
    if not keep:
        shutil.rmtree(out)
    return result


def table(runs: list[dict]) -> str:
    lines = ["| N (+10% history) | embedding | compact wall / CPU / RSS | rewritten | files "
             "before -> after | one row per key | query before -> after | lookup after | "
             "latest_batches RSS | report wall / RSS | nightly +1,000: wall / RSS / rewritten "
             "| load |", "|" + "---|" * 12]
    for r in runs:
        c, q0, q1, nc, rep = (r["compact"], r["query_before"], r["query_after"],
                              r["nightly_compact"], r["report"])
        lines.append(
            f"| {r['n']:,} | {'1280 f16' if r['embedding'] else 'no'} | {c['wall_seconds']} s / "
            f"{c['cpu_seconds']} s / {c['peak_rss_mb']} MiB | {c['bytes_rewritten'] / 2**20:,.0f} MiB "
            f"| {r['files_before']:,} -> {r['files_after']} | {r['one_row_per_key']} | "
            f"{q0['wall_seconds']} s / {q0['peak_rss_mb']} MiB -> {q1['wall_seconds']} s / "
            f"{q1['peak_rss_mb']} MiB | {r['lookup_after']['wall_seconds']} s | "
            f"{r['latest_batches']['peak_rss_mb']} MiB | {rep['wall_seconds']} s / "
            f"{rep['peak_rss_mb']} MiB | {nc['wall_seconds']} s / {nc['peak_rss_mb']} MiB / "
            f"{nc['rewritten_share'] * 100:.3f}% | {r['loadavg_start']:.1f}-{r['loadavg_end']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
