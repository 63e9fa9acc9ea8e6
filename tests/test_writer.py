import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.types import ErrorRecord, ImageRef, Labels
from pipeline import store
from pipeline.writer import SCHEMA, PartWriter, RunStamp, error_table, prediction_table

STAMP = RunStamp("m", "run1")
LABELS = Labels(("a", "b", "c"), ("alpha", "beta", "gamma"))


def refs(n, start=0):
    return [ImageRef(f"img{i}", f"/x/img{i}.jpg", 100 + i, 1_700_000_000_000_000_000 + i)
            for i in range(start, start + n)]


def test_prediction_rows_carry_topk_best_first():
    idx = np.array([[2, 0], [1, 2]])
    scores = np.array([[0.7, 0.2], [0.5, 0.4]], np.float32)
    t = prediction_table(refs(2), np.array([10, 20]), np.array([5, 6]), idx, scores, STAMP, LABELS)
    assert t.schema.equals(SCHEMA)
    rows = t.to_pylist()
    assert rows[0]["label_id"] == "c" and rows[0]["label"] == "gamma"
    assert rows[0]["labels"] == ["gamma", "alpha"] and rows[1]["label_ids"] == ["b", "c"]
    assert rows[1]["scores"] == pytest.approx([0.5, 0.4]) and rows[1]["width"] == 20
    assert rows[0]["mtime"].timestamp() == pytest.approx(1_700_000_000.0)


def test_error_rows_have_kind_message_and_no_labels():
    t = error_table([ErrorRecord(refs(1)[0], "corrupt", "bad data", 3, 4)], STAMP)
    (row,) = t.to_pylist()
    assert row["status"] == "error" and row["error_kind"] == "corrupt" and row["error"] == "bad data"
    assert row["label"] is None and row["labels"] is None and (row["width"], row["height"]) == (3, 4)


def test_parts_are_cut_at_part_size_and_named_by_run(tmp_path):
    w = PartWriter(store.open_output(str(tmp_path)), "run1", part_size=4, metadata={"pipeline.model": "m"})
    for start in (0, 3, 6):
        n = 3
        w.add(prediction_table(refs(n, start), np.ones(n), np.ones(n), np.zeros((n, 1), int),
                               np.ones((n, 1), np.float32), STAMP, LABELS))
    assert w.committed_parts == ["part-run1-00000.parquet", "part-run1-00001.parquet"]
    w.commit()
    assert len(w.committed_parts) == 3 and w.committed_rows == 9
    ids = pq.read_table(tmp_path).column("image_id").to_pylist()
    assert sorted(ids) == sorted(f"img{i}" for i in range(9))
    assert pq.read_schema(tmp_path / "part-run1-00000.parquet").metadata[b"pipeline.model"] == b"m"
    assert not list(tmp_path.glob("_tmp*"))


def test_a_failed_write_leaves_no_part_and_no_temp_file(tmp_path, monkeypatch):
    import pipeline.writer as writer

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.pq, "write_table", boom)
    w = PartWriter(store.open_output(str(tmp_path)), "run1", part_size=1, metadata={})
    with pytest.raises(OSError, match="No space"):
        w.add(error_table([ErrorRecord(refs(1)[0], "corrupt", "x")], STAMP))
    assert list(tmp_path.iterdir()) == []
