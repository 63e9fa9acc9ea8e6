"""What counts as done includes the weights and how they are run (#13.4), through the CLI."""
import pyarrow.parquet as pq
import pytest

from conftest import latest, read_summary
from test_custom_model import small_classifier


def label(cli, photos_dir, out, model, labels, *extra):
    proc = cli("label", photos_dir, out, "--model", model, "--labels", labels,
               "--preprocess", "tf", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return read_summary(proc)


@pytest.fixture
def pets(tmp_path):
    (tmp_path / "pets.txt").write_text("cat\ndog\nbird\n")
    small_classifier(seed=0).save(tmp_path / "pets.keras")
    return tmp_path / "pets.keras", tmp_path / "pets.txt"


def part_metadata(out):
    return [pq.read_schema(p).metadata for p in sorted(out.glob("part-*.parquet"))]


def test_weights_overwritten_in_place_are_relabeled_and_the_same_weights_skip(
        cli, photos_dir, pets, tmp_path):
    model, labels = pets
    out = tmp_path / "out"
    first = label(cli, photos_dir, out, model, labels)
    n = first["labeled"]
    assert n > 0 and label(cli, photos_dir, out, model, labels)["skipped"] == n
    before = latest(out).set_index("image_id")["scores"]
    small_classifier(seed=1).save(model)  # retrained, same file name
    again = label(cli, photos_dir, out, model, labels)
    assert (again["labeled"], again["skipped"]) == (n, 0)
    assert label(cli, photos_dir, out, model, labels)["skipped"] == n
    current = latest(out).set_index("image_id")
    assert len(current) == n and (current["model"] == "pets.keras").all()  # one row per image
    assert all(list(current.loc[i, "scores"]) != list(before[i]) for i in current.index)
    shas = {m[b"pipeline.weights_sha256"] for m in part_metadata(out)}
    assert len(shas) == 2  # the old weights' rows stay readable


def test_another_runtime_relabels_and_outputs_from_before_the_upgrade_count(
        cli, photos_dir, pets, tmp_path):
    model, labels = pets
    out = tmp_path / "out"
    n = label(cli, photos_dir, out, model, labels)["labeled"]  # auto: LiteRT on this CPU host
    assert {m[b"pipeline.runtime"] for m in part_metadata(out)} == {b"litert"}
    keras_run = label(cli, photos_dir, out, model, labels, "--runtime", "keras")
    assert (keras_run["labeled"], keras_run["skipped"]) == (n, 0)
    assert label(cli, photos_dir, out, model, labels, "--runtime", "keras")["skipped"] == n
    assert label(cli, photos_dir, out, model, labels, "--runtime", "litert")["labeled"] == n

    # an output written before runtime/precision (and the feed, recorded later) were
    # recorded: those parts count as done
    old = tmp_path / "old"
    label(cli, photos_dir, old, model, labels)
    for path in old.glob("part-*.parquet"):
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items()
                if k not in (b"pipeline.runtime", b"pipeline.precision", b"pipeline.feed")}
        pq.write_table(table.replace_schema_metadata(meta), path)
    assert label(cli, photos_dir, old, model, labels, "--runtime", "keras")["skipped"] == n


def test_switching_scaled_decode_relabels_and_outputs_from_before_the_upgrade_count(
        cli, photos_dir, pets, tmp_path):
    """--no-scaled-decode changes the scores of large JPEGs, so it is part of what is done, like
    the runtime; parts written before the setting was recorded match either setting."""
    model, labels = pets
    out = tmp_path / "out"
    n = label(cli, photos_dir, out, model, labels)["labeled"]
    assert {m[b"pipeline.decode"] for m in part_metadata(out)} == {b"scaled"}
    full = label(cli, photos_dir, out, model, labels, "--no-scaled-decode")
    assert (full["labeled"], full["skipped"]) == (n, 0)
    assert {m[b"pipeline.decode"] for m in part_metadata(out)} == {b"scaled", b"full"}
    assert label(cli, photos_dir, out, model, labels, "--no-scaled-decode")["skipped"] == n
    assert label(cli, photos_dir, out, model, labels, "--scaled-decode")["labeled"] == n

    old = tmp_path / "old"
    label(cli, photos_dir, old, model, labels)
    for path in old.glob("part-*.parquet"):
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"pipeline.decode"}
        pq.write_table(table.replace_schema_metadata(meta), path)
    assert label(cli, photos_dir, old, model, labels, "--no-scaled-decode")["skipped"] == n
    assert label(cli, photos_dir, old, model, labels)["skipped"] == n


def test_another_feed_relabels_and_outputs_from_before_the_feed_count(cli, photos_dir, pets,
                                                                     tmp_path):
    """The uint8 feed rounds the pixels, so its scores differ slightly from the float feed's:
    the feed is part of what makes a row done; parts that do not record it match any feed."""
    model, labels = pets
    out = tmp_path / "out"
    n = label(cli, photos_dir, out, model, labels, "--runtime", "keras")["labeled"]
    assert {m[b"pipeline.feed"] for m in part_metadata(out)} == {b"uint8"}  # auto on keras
    assert label(cli, photos_dir, out, model, labels, "--runtime", "keras", "--feed",
                 "uint8")["skipped"] == n
    float_feed = label(cli, photos_dir, out, model, labels, "--runtime", "keras", "--feed", "float32")
    assert (float_feed["labeled"], float_feed["skipped"]) == (n, 0)
    assert {m[b"pipeline.feed"] for m in part_metadata(out)} == {b"uint8", b"float32"}

    for path in out.glob("part-*.parquet"):  # as written before the feed was recorded
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"pipeline.feed"}
        pq.write_table(table.replace_schema_metadata(meta), path)
    assert label(cli, photos_dir, out, model, labels, "--runtime", "keras")["skipped"] == n


def test_int8_relabels_float32_rows_and_auto_stays_float32(cli, photos_dir, pets, tmp_path):
    model, labels = pets
    out = tmp_path / "out"
    n = label(cli, photos_dir, out, model, labels)["labeled"]  # auto: LiteRT float32 here
    assert {m[b"pipeline.precision"] for m in part_metadata(out)} == {b"float32"}
    assert label(cli, photos_dir, out, model, labels, "--precision", "float32")["skipped"] == n
    int8 = label(cli, photos_dir, out, model, labels, "--precision", "int8")
    assert (int8["labeled"], int8["skipped"]) == (n, 0)
    assert {m[b"pipeline.precision"] for m in part_metadata(out)} == {b"float32", b"int8"}
    assert label(cli, photos_dir, out, model, labels, "--precision", "int8",
                 "--runtime", "litert")["skipped"] == n
    current = latest(out)
    assert len(current) == n and current["score"].between(0, 1.05).all()


@pytest.mark.parametrize("how", ["flags", "config"])
def test_int8_with_the_keras_runtime_exits_2_naming_the_key(cli, photos_dir, tmp_path, how):
    config = tmp_path / "int8.toml"
    config.write_text('precision = "int8"\nruntime = "keras"\n')
    flags = (["--precision", "int8", "--runtime", "keras"] if how == "flags"
             else ["--config", config])
    proc = cli("label", photos_dir, tmp_path / "out", *flags)
    assert proc.returncode == 2, proc.stderr
    assert "--precision int8" in proc.stderr and "--runtime litert" in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))
