"""A part-*.parquet in OUTPUT that the tool did not write (text, half a file, another schema)
stops `label` and `compact` with exit 4 naming the file, before anything is labeled."""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline import store
from pipeline.store.parts import CorruptPart, check_part
from pipeline.writer import SCHEMA


@pytest.fixture(scope="module")
def labeled_once(cli, photos_dir, tmp_path_factory):
    """photos_dir labeled twice with part size 2 (so compact has work), one real OUTPUT."""
    out = tmp_path_factory.mktemp("parts") / "out"
    proc = cli("label", photos_dir, out, "--part-size", "2")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def output(labeled_once, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled_once, out)
    return out


def _real_part(out):
    return sorted(out.glob("part-*.parquet"))[0]


def stray_text(out):
    (out / "part-notes.parquet").write_text("this is not parquet\n")
    return out / "part-notes.parquet"


def truncated(out):
    data = _real_part(out).read_bytes()
    (out / "part-half.parquet").write_bytes(data[: len(data) // 2])
    return out / "part-half.parquet"


def foreign_schema(out):
    pq.write_table(pa.table({"image_id": ["a.jpg"], "model": ["efficientnet_lite0"],
                             "price": [3.5]}), out / "part-foreign.parquet")
    return out / "part-foreign.parquet"


def retyped_column(out):
    table = pq.read_table(_real_part(out))
    i = table.schema.get_field_index("file_size")
    table = table.set_column(i, "file_size", table.column("file_size").cast(pa.string()))
    pq.write_table(table, out / "part-retyped.parquet")
    return out / "part-retyped.parquet"


BAD_PARTS = [stray_text, truncated, foreign_schema, retyped_column]


@pytest.mark.parametrize("make_bad", BAD_PARTS)
def test_check_part_names_the_file_and_what_to_do(output, make_bad):
    bad = make_bad(output)
    with pytest.raises(CorruptPart) as e:
        check_part(store.open_output(str(bad.parent)), bad.name)
    assert str(bad) in str(e.value) and "move" in str(e.value)


def test_check_part_accepts_the_writers_parts(output):
    for part in output.glob("part-*.parquet"):
        assert check_part(store.open_output(str(output)), part.name).schema_arrow.names == SCHEMA.names


@pytest.mark.parametrize("command", ["label", "compact"])
@pytest.mark.parametrize("make_bad", BAD_PARTS)
def test_a_bad_part_stops_label_and_compact_with_exit_4_naming_it(cli, photos_dir, output,
                                                                    make_bad, command):
    bad = make_bad(output)
    before = sorted(p.name for p in output.iterdir())
    args = ["label", photos_dir, output] if command == "label" else ["compact", output]
    proc = cli(*args)
    assert proc.returncode == 4, proc.stderr
    assert bad.name in proc.stderr and "move that file out of OUTPUT" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = sorted(p.name for p in output.iterdir())
    assert [n for n in after if n.startswith("part-")] == [n for n in before if n.startswith("part-")]


def test_after_moving_the_bad_part_away_the_same_command_works(cli, photos_dir, output):
    bad = truncated(output)
    assert cli("label", photos_dir, output).returncode == 4
    bad.rename(output.parent / bad.name)  # what the message says to do
    proc = cli("label", photos_dir, output, "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"skipped": 5' in proc.stdout


def test_a_stray_part_on_s3_is_exit_4_naming_it(cli_env, s3, photos_dir):
    s3.client.put_object(Bucket=s3.bucket, Key="out/part-notes.parquet", Body=b"not parquet\n")
    proc = run_cli(["label", photos_dir, f"s3://{s3.bucket}/out/"], {**cli_env, **s3.env})
    assert proc.returncode == 4, proc.stderr
    assert f"s3://{s3.bucket}/out/part-notes.parquet is not a readable Parquet file" in proc.stderr
    assert "Traceback" not in proc.stderr
