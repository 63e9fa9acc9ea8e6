"""atomic: a file appears whole under its name or not at all, and no temp file stays behind."""
import os

import pytest

from pipeline import atomic


def test_write_file_replaces_the_old_content_and_leaves_no_temp(tmp_path):
    final = tmp_path / "part-x.parquet"
    final.write_bytes(b"old")
    atomic.write_file(str(final), lambda f: f.write(b"new"))
    assert final.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["part-x.parquet"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temp(tmp_path):
    final = tmp_path / "model.keras"
    final.write_bytes(b"old")
    seen = []

    def half_then_fail(f):
        f.write(b"half")
        seen.extend(os.listdir(tmp_path))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic.write_file(str(final), half_then_fail)
    assert final.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.keras"]
    temp = next(n for n in seen if n != "model.keras")  # it existed while writing ...
    assert temp.startswith("_tmp-") and not temp.endswith(".parquet")  # ... hidden from readers


def test_a_writer_that_needs_a_file_name_gets_one_with_its_suffix(tmp_path):
    final = tmp_path / "lite0.weights.h5"
    with atomic.replacing(str(final), suffix=".weights.h5") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith("_tmp-") and tmp.endswith(".weights.h5")
        assert not final.exists()
        with open(tmp, "wb") as f:
            f.write(b"weights")
    assert final.read_bytes() == b"weights" and os.listdir(tmp_path) == [final.name]


def test_an_interrupt_inside_the_block_removes_the_temp(tmp_path):
    final = tmp_path / "cache.tflite"
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(str(final)) as tmp:
            open(tmp, "wb").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_temp_name_never_looks_like_a_part(tmp_path):
    with pytest.raises(ValueError):
        atomic.temp_path(str(tmp_path / "part-x.parquet"), suffix=".parquet")
