"""Odd INPUTs through the CLI: manifest entries that name no file, a BOM, malformed CSV rows,
names that are not UTF-8 next to their escaped spelling, hidden files."""
import json
import os
import shutil

import pandas as pd

from conftest import SKIMAGE_PHOTOS, read_summary, save_photo, skimage_photo


def rows_by_id(out):
    return {r.image_id: r for r in pd.read_parquet(out).itertuples()}


def run_manifest(out, summary):
    return json.loads((out / "_runs" / f"{summary['run_id']}.json").read_text())


def test_txt_manifest_with_a_bom_and_a_nul_byte_line(cli, photos_dir, tmp_path):
    manifest, out = tmp_path / "list.txt", tmp_path / "out"
    manifest.write_bytes(b"\xef\xbb\xbf" + os.fsencode(photos_dir / "astronaut.jpg") + b"\n"
                         + b"broken\x00name.jpg\n" + os.fsencode(photos_dir / "chelsea.jpg") + b"\n")
    proc = cli("label", manifest, out, "--json", "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"]) == (2, 1)
    assert summary["errors_by_kind"] == {"invalid_entry": 1}
    rows = rows_by_id(out)
    first = rows[str(photos_dir / "astronaut.jpg")]  # the BOM is not part of the id
    assert first.status == "ok"
    assert rows[str(photos_dir / "chelsea.jpg")].label_id in SKIMAGE_PHOTOS["chelsea"]
    bad = rows["broken\\x00name.jpg"]
    assert (bad.status, bad.error_kind) == ("error", "invalid_entry")
    assert bad.error == "manifest list.txt line 2: the path contains a NUL byte, which no file name can"
    assert run_manifest(out, summary)["summary"]["exit_code"] == 0
    again = cli("label", manifest, out, "--json", "--max-error-rate", "0.5")
    assert read_summary(again)["skipped"] == 3  # the entry is wrong, not the disk: not retried


def test_csv_id_with_an_empty_path_gets_an_error_row(cli, photos_dir, tmp_path):
    manifest, out = tmp_path / "list.csv", tmp_path / "out"
    manifest.write_text(f"id,path\ncat,{photos_dir / 'chelsea.jpg'}\nlost,\n")
    proc = cli("label", manifest, out, "--json", "--max-error-rate", "0.6")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"], summary["listed"]) == (1, 1, 2)
    rows = rows_by_id(out)
    assert rows["cat"].status == "ok"
    assert (rows["lost"].error_kind, rows["lost"].error) == (
        "invalid_entry", "manifest list.csv line 3: no path given for id 'lost'")


def test_a_malformed_csv_row_far_down_is_exit_2_naming_the_line(cli, tmp_path):
    lines = ["id,path"] + [f"i{n},photos/2024/camera-roll/IMG_{n:08d}.jpg" for n in range(2, 50101)]
    lines[50000] = 'x,"a, b",c'  # line 50001
    manifest, out = tmp_path / "list.csv", tmp_path / "out"
    manifest.write_text("\n".join(lines) + "\n")
    proc = cli("label", manifest, out)
    assert proc.returncode == 2, proc.stderr
    assert "list.csv line 50001 has 3 field(s) where the header has 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_non_utf8_name_and_its_escaped_spelling_are_two_images(cli, tmp_path):
    """caf<E9>.jpg and a file literally named caf\\xe9.jpg used to share one image_id: one was
    relabeled on every run and compact dropped the other. Hidden files are not labeled."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    save_photo(skimage_photo("chelsea"), inputs / os.fsdecode(b"caf\xe9.jpg"), quality=90)
    save_photo(skimage_photo("coffee"), inputs / "caf\\xe9.jpg", quality=90)
    save_photo(skimage_photo("rocket"), inputs / ".hidden.jpg", quality=90)
    save_photo(skimage_photo("rocket"), inputs / ".thumbnails" / "t.jpg", quality=90)
    proc = cli("label", inputs, out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["ignored_files"]) == (2, 2)
    rows = rows_by_id(out)
    assert sorted(rows) == ["caf\\\\xe9.jpg", "caf\\xe9.jpg"]
    assert rows["caf\\xe9.jpg"].label_id in SKIMAGE_PHOTOS["chelsea"]  # the byte E9
    assert rows["caf\\\\xe9.jpg"].label_id in SKIMAGE_PHOTOS["coffee"]  # the literal name
    again = cli("label", inputs, out, "--json")
    assert (read_summary(again)["labeled"], read_summary(again)["skipped"]) == (0, 2)
    shutil.copy(next(out.glob("part-*.parquet")), tmp_path / "copy.parquet")
    os.rename(tmp_path / "copy.parquet", out / "part-0-copy.parquet")  # duplicates to compact
    assert cli("compact", out).returncode == 0
    assert sorted(rows_by_id(out)) == ["caf\\\\xe9.jpg", "caf\\xe9.jpg"]
    assert len(pd.read_parquet(out)) == 2


def test_odd_metadata_and_dot_dot_paths_are_rows_not_the_end_of_the_run(cli, photos_dir, tmp_path):
    """One manifest, every odd value in its own row: an mtime after 2262 on disk and in the
    manifest, a uint64 size above int64, a PNG claiming 4294967295 pixels of width, `..` after a
    symlinked directory (stat, read and uri must name one file), a file used as a directory."""
    import datetime as dt
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from badfiles import png_header_only

    d = tmp_path / "in"
    (d / "real" / "sub").mkdir(parents=True)
    (d / "a").mkdir()
    shutil.copy(photos_dir / "chelsea.jpg", d / "real" / "x.jpg")
    shutil.copy(photos_dir / "motorcycle.jpg", d / "a" / "x.jpg")  # what `a/link/..` reads as text
    (d / "a" / "link").symlink_to(d / "real" / "sub")
    for name in ("future.jpg", "trusted_future.jpg", "u64.jpg"):
        shutil.copy(photos_dir / "astronaut.jpg", d / name)
    os.utime(d / "future.jpg", ns=(0, 430 * 365 * 86400 * 10**9))  # in 2399
    (d / "huge.png").write_bytes(png_header_only(2**32 - 1, 1))
    far = dt.datetime(2400, 1, 1, tzinfo=dt.timezone.utc)
    now = dt.datetime.now(dt.timezone.utc)
    size = (d / "u64.jpg").stat().st_size
    rows = [("future.jpg", None, None), ("trusted_future.jpg", size, far),
            ("u64.jpg", 2**64 - 1, now), ("huge.png", None, None),
            ("a/link/../x.jpg", None, None), ("future.jpg/x.jpg", None, None)]
    pq.write_table(pa.table({"path": [r[0] for r in rows],
                             "size": pa.array([r[1] for r in rows], pa.uint64()),
                             "mtime": pa.array([r[2] for r in rows], pa.timestamp("us", "UTC"))}),
                   d / "list.parquet")
    out = tmp_path / "out"
    proc = cli("label", d / "list.parquet", out, "--json", "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "future.jpg: its mtime (13560480000 s after 1970) is outside what the mtime column " \
           "holds" in proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"]) == (4, 2)
    got = rows_by_id(out)
    assert got["future.jpg"].status == "ok" and pd.isna(got["future.jpg"].mtime)
    for name in ("trusted_future.jpg", "u64.jpg"):  # an unusable value is read from the file
        assert (got[name].status, got[name].file_size) == ("ok", size)
        assert got[name].mtime == pd.Timestamp((d / name).stat().st_mtime_ns // 1000, unit="us",
                                               tz="UTC")
    huge = got["huge.png"]
    assert (huge.error_kind, pd.isna(huge.width), huge.height) == ("too_large", True, 1)
    assert huge.error.startswith("4294967295x1 = ")
    real = d / "real" / "x.jpg"
    link = got["a/link/../x.jpg"]
    assert (link.uri, link.file_size) == (str(real), real.stat().st_size)
    assert link.content_sha256 == hashlib.sha256(real.read_bytes()).hexdigest()
    assert link.label_id in SKIMAGE_PHOTOS["chelsea"]
    assert got["future.jpg/x.jpg"].error_kind == "not_found"
    again = cli("label", d / "list.parquet", out, "--json", "--max-error-rate", "0.5")
    assert again.returncode == 0, again.stderr
    assert read_summary(again)["labeled"] == 0  # an mtime held as null still matches next night
