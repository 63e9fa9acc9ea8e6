"""content_sha256: the sha256 of the bytes the reader read, on every row that read any; exact
duplicates are one GROUP BY (the README's query, run here through DuckDB). Parts written
before the column existed still read, resume, compact and answer pipeline.latest."""
import hashlib
import shutil

import pyarrow.parquet as pq
import pytest

import pipeline
from conftest import read_summary, save_photo, skimage_photo

# The README's exact-duplicates query (keep the two identical).
DUPLICATES = """WITH current AS (
  SELECT * FROM read_parquet('{out}/part-*.parquet', union_by_name = true)
  QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1)
SELECT content_sha256, count(*) AS copies, list(image_id ORDER BY image_id) AS image_ids
FROM current WHERE content_sha256 IS NOT NULL
GROUP BY content_sha256 HAVING count(*) > 1 ORDER BY copies DESC"""


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dups") / "in"
    save_photo(skimage_photo("chelsea"), d / "cat.jpg", quality=90)
    save_photo(skimage_photo("coffee"), d / "coffee.png")
    (d / "sub").mkdir()
    shutil.copy(d / "cat.jpg", d / "sub" / "same-cat.jpg")  # same bytes, another name
    data = (d / "coffee.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])  # read, then found corrupt
    (d / "empty.jpg").write_bytes(b"")  # never read: no hash
    return d


@pytest.fixture(scope="module")
def labeled(cli, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dups") / "out"
    proc = cli("label", inputs, out, "--json", "--max-error-rate", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def test_every_row_that_read_bytes_has_their_sha256(labeled, inputs):
    rows = {r["image_id"]: r for r in pq.read_table(labeled).to_pylist()}
    assert set(rows) == {"cat.jpg", "coffee.png", "sub/same-cat.jpg", "cut.png", "empty.jpg"}
    for image_id in ("cat.jpg", "coffee.png", "sub/same-cat.jpg", "cut.png"):
        assert rows[image_id]["content_sha256"] == sha256(inputs / image_id), image_id
    assert rows["cut.png"]["status"] == "error" and rows["cut.png"]["error_kind"] == "corrupt"
    assert rows["empty.jpg"]["error_kind"] == "empty_file"
    assert rows["empty.jpg"]["content_sha256"] is None
    assert pq.read_schema(next(labeled.glob("part-*.parquet"))).field("content_sha256").type == "string"


def test_the_readme_duplicates_query_finds_the_identical_copies(labeled, inputs):
    duckdb = pytest.importorskip("duckdb")
    groups = duckdb.sql(DUPLICATES.format(out=labeled)).fetchall()
    assert groups == [(sha256(inputs / "cat.jpg"), 2, ["cat.jpg", "sub/same-cat.jpg"])]


def test_parts_written_before_the_column_still_resume_compact_and_read(cli, inputs, tmp_path):
    """An OUTPUT whose part has no content_sha256 (as older versions wrote it)."""
    duckdb = pytest.importorskip("duckdb")
    src = tmp_path / "in"
    shutil.copytree(inputs, src)
    out = tmp_path / "out"
    assert cli("label", src, out, "--max-error-rate", "1").returncode == 0
    (part,) = out.glob("part-*.parquet")
    old = pq.read_table(part)
    pq.write_table(old.drop_columns(["content_sha256"]), part)  # keeps the file metadata
    assert "content_sha256" not in pq.read_schema(part).names

    save_photo(skimage_photo("rocket"), src / "new.jpg", quality=90)
    proc = cli("label", src, out, "--json", "--max-error-rate", "1")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert summary["labeled"] == 1 and summary["skipped"] == 5  # old rows, their errors permanent
    current = pipeline.latest(str(out)).to_pylist()
    by_id = {r["image_id"]: r for r in current}
    assert by_id["new.jpg"]["content_sha256"] == sha256(src / "new.jpg")
    assert by_id["cat.jpg"]["content_sha256"] is None  # the old part's row: unknown, not wrong
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/part-*.parquet', union_by_name = true)"
                   ).fetchall()[0][0]
    assert n == len(old) + summary["labeled"] + summary["errors"]

    proc = cli("compact", out)
    assert proc.returncode == 0, proc.stderr
    after = {r["image_id"]: r for r in pipeline.latest(str(out)).to_pylist()}
    assert after == by_id
    assert cli("label", src, out, "--json", "--max-error-rate", "1").returncode == 0
