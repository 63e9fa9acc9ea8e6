import os

import pandas as pd
import pytest

from pipeline.exitcodes import ConfigError
from pipeline.sources import SourceStats, describe_input, iter_refs, path_id


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_walk_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.jpeg", "sub/c.Png", "sub/deeper/d.webp", "notes.txt", "sub/x.csv"]:
        touch(tmp_path / name)
    stats = SourceStats()
    refs = list(iter_refs(str(tmp_path), stats))
    assert [r.image_id for r in refs] == ["a.jpeg", "b.JPG", "sub/c.Png", "sub/deeper/d.webp"]
    assert stats.ignored == 2 and stats.listed == 4
    assert all(os.path.isabs(r.uri) and r.file_size == 1 and r.mtime_ns for r in refs)


def test_macos_appledouble_files_are_skipped_like_dotfiles(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "._a.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    touch(tmp_path / "sub" / "._b.PNG")
    touch(tmp_path / ".DS_Store")
    stats = SourceStats()
    assert [r.image_id for r in iter_refs(str(tmp_path), stats)] == ["a.jpg"]
    assert stats.ignored == 3 and stats.listed == 1


def test_ids_are_stable_across_runs_and_locations(tmp_path):
    touch(tmp_path / "in" / "x" / "y.jpg")
    first = [r.image_id for r in iter_refs(str(tmp_path / "in"))]
    os.rename(tmp_path / "in", tmp_path / "moved")
    assert [r.image_id for r in iter_refs(str(tmp_path / "moved"))] == first == ["x/y.jpg"]


def test_symlink_loop_is_walked_once(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    stats = SourceStats()
    assert [r.image_id for r in iter_refs(str(tmp_path), stats)] == ["a/1.jpg"]
    assert stats.loops == 1


def test_txt_manifest_resolves_relative_paths_and_dedupes(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "list.txt").write_text("# comment\nimgs/a.jpg\n\nimgs/a.jpg\nmissing.jpg\n")
    stats = SourceStats()
    refs = list(iter_refs(str(tmp_path / "list.txt"), stats))
    assert [r.image_id for r in refs] == ["imgs/a.jpg", "missing.jpg"]
    assert refs[0].uri == str(tmp_path / "imgs" / "a.jpg") and refs[0].file_size == 1
    assert refs[1].file_size is None  # becomes a not_found error row, not a crash
    assert stats.duplicates == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_manifests_use_path_and_optional_id(tmp_path, fmt):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.png")
    df = pd.DataFrame({"path": ["a.jpg", str(tmp_path / "b.png")], "id": ["first", "2"],
                       "extra": [1, 2]})
    path = tmp_path / f"m.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    refs = list(iter_refs(str(path)))
    assert [(r.image_id, r.uri) for r in refs] == [
        ("first", str(tmp_path / "a.jpg")), ("2", str(tmp_path / "b.png"))]


def test_manifest_without_path_column_names_the_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,id\na.jpg,1\n")
    with pytest.raises(ConfigError, match="needs a 'path' column.*file, id"):
        list(iter_refs(str(path)))


def test_missing_input_and_wrong_kind_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        list(iter_refs(str(tmp_path / "nope")))
    touch(tmp_path / "x.doc")
    with pytest.raises(ConfigError, match="neither"):
        list(iter_refs(str(tmp_path / "x.doc")))


def test_empty_directory_and_manifest_give_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list(iter_refs(str(tmp_path / "empty"))) == []
    (tmp_path / "m.txt").write_text("")
    assert list(iter_refs(str(tmp_path / "m.txt"))) == []
    (tmp_path / "m.csv").write_text("")
    assert list(iter_refs(str(tmp_path / "m.csv"))) == []


def test_listing_is_a_stream(tmp_path):
    """The walk reaches a directory only when the consumer gets there: a file created in a later
    directory after the first ref was received is still listed (a walk that materialised the
    whole tree before yielding would have missed it)."""
    for i in range(5):
        touch(tmp_path / "a" / f"{i:03d}.jpg")
    (tmp_path / "z").mkdir()
    it = iter_refs(str(tmp_path))
    assert next(it).image_id == "a/000.jpg"
    touch(tmp_path / "z" / "late.jpg")
    assert [r.image_id for r in it] == ["a/001.jpg", "a/002.jpg", "a/003.jpg", "a/004.jpg",
                                        "z/late.jpg"]


@pytest.mark.timeout(30)
def test_special_files_are_listed_with_nothing_to_read(tmp_path):
    """A FIFO or a device named like an image still gets a row, but file_size None tells the
    reader not to open it (a FIFO blocks forever, /dev/zero never ends)."""
    touch(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink("a.jpg", tmp_path / "link.jpg")
    os.symlink("missing.jpg", tmp_path / "broken.jpg")
    sizes = {r.image_id: r.file_size for r in iter_refs(str(tmp_path))}
    assert sizes == {"a.jpg": 1, "broken.jpg": None, "fifo.jpg": None, "link.jpg": 1,
                     "zero.jpg": None}
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "m.txt").write_text("dir.jpg\nfifo.jpg\n")
    assert [r.file_size for r in iter_refs(str(tmp_path / "m.txt"))] == [None, None]


def test_non_utf8_names_get_an_escaped_id_and_keep_a_readable_path(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    touch(tmp_path / name)
    [ref] = iter_refs(str(tmp_path))
    assert ref.image_id == "caf\\xe9.jpg" and ref.file_size == 1
    assert os.path.exists(ref.uri)  # still the real path, for the reader
    (tmp_path / "m.txt").write_bytes(b"caf\xe9.jpg\n")  # a Latin-1 manifest line
    [ref] = iter_refs(str(tmp_path / "m.txt"))
    assert ref.image_id == "caf\\xe9.jpg" and ref.file_size == 1


def test_hidden_files_and_directories_are_skipped_and_counted(tmp_path):
    for name in ["a.jpg", ".hidden.jpg", ".thumbnails/t1.jpg", ".thumbnails/t2.jpg",
                 "sub/b.png", "sub/.cache/c.jpg", "sub/.x.PNG"]:
        touch(tmp_path / name)
    stats = SourceStats()
    assert [r.image_id for r in iter_refs(str(tmp_path), stats)] == ["a.jpg", "sub/b.png"]
    assert stats.ignored == 4  # .hidden.jpg, .thumbnails/ (not entered), sub/.cache/, sub/.x.PNG


def test_hidden_files_named_explicitly_are_labeled(tmp_path):
    touch(tmp_path / ".thumbnails" / "t.jpg")
    (tmp_path / "m.txt").write_text(".thumbnails/t.jpg\n")
    assert [r.file_size for r in iter_refs(str(tmp_path / "m.txt"))] == [1]
    assert [r.image_id for r in iter_refs(str(tmp_path / ".thumbnails" / "t.jpg"))] == ["t.jpg"]


def test_a_bom_is_not_part_of_the_first_path(tmp_path):
    touch(tmp_path / "img1.jpg")
    touch(tmp_path / "img2.jpg")
    (tmp_path / "m.txt").write_bytes(b"\xef\xbb\xbfimg1.jpg\r\nimg2.jpg\r\n")
    refs = list(iter_refs(str(tmp_path / "m.txt")))
    assert [(r.image_id, r.file_size) for r in refs] == [("img1.jpg", 1), ("img2.jpg", 1)]


def test_a_nul_byte_in_a_txt_line_is_an_invalid_entry_for_that_line_only(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "c.jpg")
    (tmp_path / "m.txt").write_bytes(b"a.jpg\nb\x00.jpg\nc.jpg\n")
    refs = list(iter_refs(str(tmp_path / "m.txt")))
    assert [r.image_id for r in refs] == ["a.jpg", "b\\x00.jpg", "c.jpg"]
    assert [r.file_size for r in refs] == [1, None, 1]
    assert refs[0].entry_error is None and refs[2].entry_error is None
    assert refs[1].entry_error == "manifest m.txt line 2: the path contains a NUL byte, which no file name can"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_id_with_an_empty_path_is_an_invalid_entry_not_dropped(tmp_path, fmt):
    touch(tmp_path / "a.jpg")
    df = pd.DataFrame({"id": ["x", "y", "z", None], "path": ["a.jpg", "", None, None]})
    path = tmp_path / f"m.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    refs = list(iter_refs(str(path)))
    assert [r.image_id for r in refs] == ["x", "y", "z"]  # the fully blank row is no entry
    unit = "line" if fmt == "csv" else "row"
    assert refs[1].entry_error == f"manifest m.{fmt} {unit} {3 if fmt == 'csv' else 2}: no path given for id 'y'"
    assert refs[2].entry_error.startswith(f"manifest m.{fmt} {unit} {4 if fmt == 'csv' else 3}: no path")
    assert refs[0].entry_error is None and refs[0].file_size == 1


@pytest.mark.parametrize("bad_line", [51, 50001])
def test_a_malformed_csv_row_is_a_config_error_naming_its_line_wherever_it_is(tmp_path, bad_line):
    lines = ["id,path"] + [f"i{n},p{n}.jpg" for n in range(2, 60001)]
    lines[bad_line - 1] = "x,y,z"
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"m.csv line {bad_line} has 3 field\(s\) where the header has 2: 'x,y,z'"):
        describe_input(str(tmp_path / "m.csv"))
    with pytest.raises(ConfigError, match=rf"line {bad_line}"):
        list(iter_refs(str(tmp_path / "m.csv")))


@pytest.mark.parametrize("name, expected", [
    ("a/b.jpg", "a/b.jpg"),
    ("café.jpg", "café.jpg"),
    (os.fsdecode(b"caf\xe9.jpg"), "caf\\xe9.jpg"),  # the byte E9: backslash x e 9
    ("caf\\xe9.jpg", "caf\\\\xe9.jpg"),  # those characters: the backslash doubled
    ("a\\b.jpg", "a\\\\b.jpg"),
    ("b\x00.jpg", "b\\x00.jpg"),
])
def test_path_ids_escape_the_escape_character(name, expected):
    assert path_id(name) == expected


def test_a_name_that_is_not_utf8_and_its_escaped_spelling_get_two_ids(tmp_path):
    touch(tmp_path / os.fsdecode(b"caf\xe9.jpg"), b"1")
    touch(tmp_path / "caf\\xe9.jpg", b"22")
    refs = list(iter_refs(str(tmp_path)))
    assert sorted((r.image_id, r.file_size) for r in refs) == [
        ("caf\\\\xe9.jpg", 2), ("caf\\xe9.jpg", 1)]
