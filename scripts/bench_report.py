"""What `pipeline report` costs on a big OUTPUT: wall time and peak RSS of the real CLI.

    python scripts/bench_report.py [--rows 1000000] [--keep DIR]

Synthesizes, with pyarrow, an OUTPUT of --rows current rows in the writer's schema (4096-row
parts, as runs write them) plus `content_sha256` on every row (1 in 500 images has a
byte-identical twin) and an `embedding` column (1280 float16) in --embedding-parts parts only
(a few runs made with --embeddings): 1,000 distinct labels with a skewed frequency, uniform
scores, 2% error rows of four kinds, 30 run manifests. The rows' uris point at a handful of
real JPEGs (and one missing file), so the thumbnails are real decodes. Then it runs
`python -m pipeline report OUTPUT -o report.html` and reports its wall time, CPU seconds and
peak RSS (os.wait4's), and the page's size. Results: bench-results/bench_report.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
MODEL = "efficientnet_lite0"
PART_ROWS = 4096
LABELED_AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
ERROR_KINDS = ["corrupt", "not_found", "unsupported_format", "too_large"]


def main() -> int:
    args = parse_args()
    from bench_scale import machine, run_measured

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-report-"))
    output = work / "out"
    if output.exists():
        shutil.rmtree(output)
    photos = write_photos(work / "photos")
    write_output(output, args.rows, photos, args.embedding_parts)
    html = work / "report.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code, wall, rss, _, err, cpu = run_measured(
        [sys.executable, "-m", "pipeline", "report", str(output), "-o", str(html)], env)
    if code != 0:
        print(err, file=sys.stderr)
        return 1
    result = {"rows": args.rows, "embedding_rows": min(args.rows, args.embedding_parts * PART_ROWS),
              "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
              "peak_rss_mb": round(rss / 2**20),
              "page_bytes": html.stat().st_size, "summary": err.strip().splitlines()[-1],
              "machine": machine(), "when": dt.datetime.now(dt.timezone.utc).isoformat()}
    print(json.dumps(result, indent=1))
    out = ROOT / "bench-results" / "bench_report.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--embedding-parts", type=int, default=4,
                   help="parts (of 4096 rows) that carry an embedding column")
    p.add_argument("--keep", help="work in this folder and keep it")
    return p.parse_args()


def write_photos(directory: Path) -> list[str]:
    """Five real JPEGs (scikit-image's photos) and the path of one that does not exist."""
    import skimage.data
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera"):
        image = getattr(skimage.data, name)()
        path = directory / f"{name}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(str(path))
    return paths + [str(directory / "missing.jpg")]


def write_output(output: Path, n: int, photos: list[str], embedding_parts: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_scale import image_id

    output.mkdir(parents=True)
    write_manifests(output / "_runs", n)
    rng = np.random.default_rng(0)
    names = [f"label_{i:03d}" for i in range(1000)]
    for seq, start in enumerate(range(0, n, PART_ROWS)):
        k = min(PART_ROWS, n - start)
        index = np.arange(start, start + k)
        table = rows(image_id(index), index, photos, names, rng)
        if seq < embedding_parts:
            vectors = rng.standard_normal((k, 1280)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.float16).ravel()), 1280))  # as --embeddings writes
        pq.write_table(table, output / f"part-20250601T000000Z-synth-{seq:06d}.parquet",
                       compression="zstd")


def rows(ids, index: np.ndarray, photos: list[str], names: list[str], rng):
    """One part's rows in the writer's schema plus content_sha256."""
    import pyarrow as pa

    from pipeline.writer import SCHEMA

    k = len(index)
    error = rng.random(k) < 0.02
    label = np.minimum(rng.zipf(1.3, k) - 1, len(names) - 1)
    score = rng.random(k).astype(np.float32)
    kinds = np.array(ERROR_KINDS)[index % len(ERROR_KINDS)]
    twin = np.where(index % 1000 == 1, index - 1, index)  # 1 in 500 images has a twin
    digests = [hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in twin]
    labels = pa.array(np.array(names, dtype=object)[label]).take(pa.array(np.arange(k)))
    offsets = pa.array(np.arange(k + 1, dtype=np.int32))
    columns = {
        "image_id": ids,
        "uri": pa.array(np.array(photos, dtype=object)[index % len(photos)]),
        "status": pa.array(np.where(error, "error", "ok")),
        "error_kind": pa.array(np.where(error, kinds, None)),
        "error": pa.array(np.where(error, np.char.add("synthetic failure: ", kinds), None)),
        "width": pa.array(np.full(k, 640, np.int32)), "height": pa.array(np.full(k, 480, np.int32)),
        "file_size": pa.array(np.full(k, 100_000, np.int64)),
        "mtime": pa.array(np.full(k, 1_700_000_000_000_000, np.int64)).cast(pa.timestamp("us", tz="UTC")),
        "label_id": pa.array(np.where(error, None, np.char.add("n", label.astype(str)))),
        "label": pc_where(error, labels),
        "score": pa.array(score, mask=error),
        "label_ids": pa.ListArray.from_arrays(offsets, pa.array(np.char.add("n", label.astype(str)))),
        "labels": pa.ListArray.from_arrays(offsets, labels),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(score)),
        "model": pa.array([MODEL] * k),
        "run_id": pa.array([f"20250601T000000Z-synth{int(index[0]) // 40_000:03d}"] * k),
        "labeled_at": pa.array([LABELED_AT] * k, pa.timestamp("us", tz="UTC")),
        "content_sha256": pa.array(digests),
    }
    extra = [pa.field(n, columns[n].type) for n in columns if n not in SCHEMA.names]
    schema = pa.schema(list(SCHEMA) + extra)  # content_sha256: in SCHEMA once lane embed lands
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def pc_where(mask: np.ndarray, values):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pa.array(mask), pa.nulls(len(mask), pa.string()), values)


def write_manifests(runs: Path, n: int) -> None:
    runs.mkdir(parents=True)
    for r in range(30):
        run_id = f"2025060{1 + r // 10}T0{r % 10}0000Z-synth{r:03d}"
        summary = {"run_id": run_id, "model": MODEL, "labeled": n // 30, "errors": n // 1500,
                   "skipped": r * n // 30, "wall_seconds": n / 30 / 120.0,
                   "images_per_second": 120.0, "exit_code": 0}
        (runs / f"{run_id}.json").write_text(json.dumps(
            {"run_id": run_id, "finished_at": f"2025-06-0{1 + r // 10}T0{r % 10}:00:00+00:00",
             "summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
