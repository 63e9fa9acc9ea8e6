"""The background part writer: rows keep their order, errors reach the caller, interrupts keep rows."""
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.types import Labels
from pipeline.writer import BackgroundWriter, PartWriter, RunStamp, prediction_table
from test_writer import refs

STAMP = RunStamp("m", "run1")
LABELS = Labels(("a", "b"), ("alpha", "beta"))


def rows(start, n=3):
    def build():
        return prediction_table(refs(n, start), np.ones(n), np.ones(n), np.zeros((n, 1), int),
                                np.ones((n, 1), np.float32), STAMP, LABELS)
    return build


def disk_full(monkeypatch):
    import pipeline.writer as writer

    def write_table(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.pq, "write_table", write_table)


def test_rows_are_built_and_written_off_the_callers_thread_in_order(tmp_path):
    threads = set()

    def traced(build):
        def wrapped():
            threads.add(threading.current_thread().name)
            return build()
        return wrapped

    w = PartWriter(store.open_output(str(tmp_path)), "run1", part_size=4, metadata={})
    bg = BackgroundWriter(w, max_queued=2)
    for start in range(0, 30, 3):
        bg.submit(traced(rows(start)))
    bg.close()
    assert threads == {"part-writer"}
    assert w.committed_rows == 30 and len(w.committed_parts) == 8
    ids = [i for p in w.committed_parts for i in pq.read_table(tmp_path / p).column("image_id").to_pylist()]
    assert ids == [f"img{i}" for i in range(30)]


def test_a_write_error_reaches_the_caller_and_nothing_is_half_written(tmp_path, monkeypatch):
    disk_full(monkeypatch)
    bg = BackgroundWriter(PartWriter(store.open_output(str(tmp_path)), "run1", part_size=1, metadata={}), max_queued=2)
    with pytest.raises(OSError, match="No space left"):
        for start in range(100):  # the writer stops at its first error; the queue fills up
            bg.submit(rows(start))
    bg.close()  # raised once already: not again, and nothing more is written
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_at_the_last_part_is_raised_by_close(tmp_path, monkeypatch):
    bg = BackgroundWriter(PartWriter(store.open_output(str(tmp_path)), "run1", part_size=100, metadata={}))
    bg.submit(rows(0))
    disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        bg.close()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_in_the_caller_still_commits_every_submitted_row(tmp_path):
    w = PartWriter(store.open_output(str(tmp_path)), "run1", part_size=4, metadata={})
    bg = BackgroundWriter(w)
    with pytest.raises(KeyboardInterrupt):
        try:
            for start in range(0, 15, 3):
                bg.submit(rows(start))
            raise KeyboardInterrupt
        finally:
            bg.close()
    assert pq.read_table(tmp_path).num_rows == 15 == w.committed_rows
