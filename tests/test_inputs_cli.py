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
