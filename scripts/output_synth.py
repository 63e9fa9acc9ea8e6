"""Synthesized OUTPUTs for the output benchmarks: N current images in the writer's schema and
file metadata (4096-row parts, as runs write them), plus superseded history (a fraction of the
images labeled again later, in later parts), optionally with an `embedding` column."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from bench_scale import MODEL, image_id

LABELED_AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
RELABELED_AT = dt.datetime(2025, 7, 1, tzinfo=dt.timezone.utc)
LABELS = np.array([f"n{i:08d}" for i in range(1000)], dtype=object)
NAMES = np.array([f"label {i}" for i in range(1000)], dtype=object)


def metadata() -> dict[str, str]:
    """The file metadata a run of MODEL writes (without resolving the model: no TensorFlow)."""
    from pipeline import __version__

    return {"pipeline.model": MODEL, "pipeline.weights_sha256": "synthetic",
            "pipeline.preprocessing": "synthetic", "pipeline.runtime": "litert",
            "pipeline.precision": "float32", "pipeline.top_k": "5",
            "pipeline.version": __version__}


def write_output(output: Path, n: int, history: float = 0.1, part_rows: int = 4096,
                 embedding_width: int | None = None, seed: int = 0) -> int:
    """N images labeled once (ids 0..N-1, run 2025-06-01) and `history` * N of them labeled
    again (a random sample, run 2025-07-01, later parts). Returns the rows written."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "_runs").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    write_parts(output, np.arange(n), LABELED_AT, "20250601T000000Z-synth", part_rows,
                embedding_width, rng)
    again = np.sort(rng.choice(n, int(n * history), replace=False)) if history else np.arange(0)
    write_parts(output, again, RELABELED_AT, "20250701T000000Z-synth", part_rows,
                embedding_width, rng)
    return n + len(again)


def write_parts(output: Path, ids: np.ndarray, labeled_at: dt.datetime, run_id: str,
                part_rows: int, embedding_width: int | None, rng) -> None:
    """Rows for `ids` in parts of `part_rows`: top-5 labels drawn from 1,000 with a skew,
    random scores (so the Parquet compresses about as real output does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.writer import part_schema

    schema = part_schema(embedding_width).with_metadata(metadata())
    for seq, start in enumerate(range(0, len(ids), part_rows)):
        index = ids[start:start + part_rows]
        k = len(index)
        offsets = pa.array(np.arange(0, 5 * k + 1, 5, dtype=np.int32))
        top = np.minimum(rng.zipf(1.3, (k, 5)) - 1, 999).ravel()
        scores = np.sort(rng.random((k, 5)).astype(np.float32), axis=1)[:, ::-1]
        columns = {
            "image_id": image_id(index), "uri": pa.array([f"/archive/{i}.jpg" for i in index]),
            "status": pa.array(["ok"] * k), "width": pa.array(np.full(k, 256, np.int32)),
            "height": pa.array(np.full(k, 192, np.int32)),
            "file_size": pa.array(np.full(k, 100_000, np.int64)),
            "mtime": pa.array(np.full(k, 1_700_000_000_000_000, np.int64)).cast(
                pa.timestamp("us", tz="UTC")),
            "label_id": pa.array(LABELS[top[::5]]), "label": pa.array(NAMES[top[::5]]),
            "score": pa.array(scores[:, 0].copy()),
            "label_ids": pa.ListArray.from_arrays(offsets, pa.array(LABELS[top])),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(NAMES[top])),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
            "model": pa.array([MODEL] * k), "run_id": pa.array([run_id] * k),
            "labeled_at": pa.array([labeled_at] * k, pa.timestamp("us", tz="UTC")),
        }
        if embedding_width:
            vectors = rng.standard_normal((k, embedding_width)).astype(np.float16)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.ravel()), embedding_width)
        table = pa.table({f.name: columns.get(f.name, pa.nulls(k, f.type)) for f in schema},
                         schema=schema)
        pq.write_table(table, output / f"part-{run_id}-{seq:06d}.parquet", compression="zstd")
