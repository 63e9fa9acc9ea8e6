"""Cron-grade behaviour through the CLI: exit codes a nightly job can trust, and clear messages."""
import json
import os

import pandas as pd
import pytest

from conftest import read_summary


# -- a broken mount is not a quiet night -------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty folder", "only non-images", "empty manifest"])
def test_no_images_in_input_exits_2_before_output_exists(cli, tmp_path, kind):
    feed = tmp_path / "mnt"
    feed.mkdir()
    if kind == "only non-images":
        (feed / "README.txt").write_text("mount point")
    if kind == "empty manifest":
        feed = tmp_path / "list.csv"
        feed.write_text("path,id\n")
    proc = cli("label", feed, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert f"no images in INPUT {feed}" in proc.stderr
    assert "--allow-empty" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_allow_empty_accepts_an_empty_feed(cli, tmp_path):
    (tmp_path / "feed").mkdir()
    proc = cli("label", tmp_path / "feed", tmp_path / "out", "--allow-empty")
    assert proc.returncode == 0, proc.stderr
    assert "no images in the input" in proc.stderr
    (tmp_path / "cfg.toml").write_text("allow_empty = true\n")
    proc = cli("label", tmp_path / "feed", tmp_path / "out2", "--config", tmp_path / "cfg.toml")
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "out").glob("part-*")) == []


def test_an_input_that_is_all_done_is_not_empty(cli, photos_dir, tmp_path):
    assert cli("label", photos_dir, tmp_path / "out").returncode == 0
    proc = cli("label", photos_dir, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "nothing new to label" in proc.stderr


# -- unexpected failures: exit 4, one line, the traceback in the run's log ------------------------

@pytest.fixture(scope="module")
def failing_model(tmp_path_factory):
    """A real .keras model that loads fine but fails at inference on anything but 32x32 input:
    a fault injected from outside the code (no monkeypatching)."""
    from pipeline.tfimport import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    d = tmp_path_factory.mktemp("failing")
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Reshape((32 * 32 * 3,))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.save(d / "reshape32.keras")
    (d / "labels.txt").write_text("a\nb\n")
    return d


def test_an_unexpected_error_exits_4_with_one_line_and_a_log(cli, photos_dir, tmp_path,
                                                             failing_model):
    out = tmp_path / "out"
    args = ["label", photos_dir, out, "--model", failing_model / "reshape32.keras",
            "--labels", failing_model / "labels.txt", "--preprocess", "tf",
            "--input-size", "24", "--runtime", "keras"]
    proc = cli(*args)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [s for s in proc.stderr.splitlines() if "error: " in s]
    assert len(errors) == 1, proc.stderr
    assert "unexpected ValueError in pipeline/" in errors[0]
    assert "Reshape" in errors[0]  # TensorFlow's nested message names the failing layer
    (manifest,) = (out / "_runs").glob("*.json")
    run = json.loads(manifest.read_text())
    assert run["summary"]["exit_code"] == 4
    log = out / "_runs" / f"{run['run_id']}.log"
    assert f"traceback in {log}" in errors[0]
    assert log.read_text().startswith("Traceback (most recent call last)")
    assert "The total size of the tensor must be unchanged" in log.read_text()

    debug = cli(*args, "--debug")
    assert debug.returncode == 4
    assert "Traceback (most recent call last)" in debug.stderr


# -- help ------------------------------------------------------------------------------------------

def test_help_shows_bracketed_defaults_and_plain_usage(cli):
    proc = cli("label", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the help is wrapped to the terminal width
    assert "Usage: python -m pipeline label [OPTIONS] INPUT OUTPUT" in text
    assert "Images per inference batch [auto: 64 on CPU, 256 per GPU]" in text
    for default in ("[auto: litert (XNNPACK) on CPU hosts", "[local]", "[5]", "[0.05]"):
        assert default in text, default
    assert "{input}" not in text


# -- quiet nights: an unchanged failure is reported, not written or counted again -----------------

NIGHTLY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "nightly.toml")


def _nightly_feed(tmp_path, photos: int = 30):
    """A manifest of `photos` small JPEGs and one path that does not exist."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    (tmp_path / "img").mkdir()
    lines = ["path"]
    for i in range(photos):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"p{i:02d}.jpg", quality=90)
        lines.append(f"img/p{i:02d}.jpg")
    lines.append("img/gone.jpg")
    manifest = tmp_path / "feed.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _rows_of(out, image_id):
    table = pd.read_parquet(out)
    return table[table.image_id == image_id]


def test_quiet_nights_exit_0_and_an_unchanged_failure_stays_one_row(cli, tmp_path):
    manifest, out = _nightly_feed(tmp_path), tmp_path / "out"
    night1 = cli("label", manifest, out, "--config", NIGHTLY, "--json")
    assert night1.returncode == 0, night1.stderr  # 1 of 31 = 3.2% <= 5%
    first = read_summary(night1)
    assert (first["labeled"], first["errors"], first["still_failing"]) == (30, 1, 0)
    assert len(_rows_of(out, "img/gone.jpg")) == 1

    for night in (2, 3, 4):  # a year of nights is this, 365 times
        proc = cli("label", manifest, out, "--config", NIGHTLY)
        assert proc.returncode == 0, proc.stderr
        assert "still failing: 1" in proc.stderr
        assert "errors 0" in proc.stderr
        assert len(_rows_of(out, "img/gone.jpg")) == 1, f"night {night}"
    again = read_summary(cli("label", manifest, out, "--config", NIGHTLY, "--json"))
    assert (again["labeled"], again["errors"], again["still_failing"], again["skipped"]) == (0, 0, 1, 30)
    assert again["exit_code"] == 0
    assert len(pd.read_parquet(out)) == 31
    # every night leaves its manifest (the record that the job ran), with what it found
    runs = sorted((out / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 5
    last = json.loads(runs[-1].read_text())["summary"]
    assert (last["still_failing"], last["skipped"], last["exit_code"]) == (1, 30, 0)


def test_new_failures_above_the_rate_still_exit_1(cli, tmp_path):
    manifest, out = _nightly_feed(tmp_path), tmp_path / "out"
    assert cli("label", manifest, out, "--config", NIGHTLY).returncode == 0
    with open(manifest, "a") as f:  # two new entries, both broken: 2 of 2 new inputs fail
        f.write("img/new-gone.jpg\nimg/broken.jpg\n")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    proc = cli("label", manifest, out, "--config", NIGHTLY, "--json")
    assert proc.returncode == 1, proc.stderr
    summary = read_summary(proc)
    assert (summary["errors"], summary["still_failing"]) == (2, 1)
    assert summary["errors_by_kind"] == {"not_found": 1, "corrupt": 1}
    assert summary["message"].startswith("2 of 2 images failed")


def test_a_failure_that_changes_is_written_and_counted(cli, tmp_path):
    manifest, out = _nightly_feed(tmp_path), tmp_path / "out"
    assert cli("label", manifest, out, "--config", NIGHTLY).returncode == 0
    (tmp_path / "img" / "gone.jpg").write_bytes(b"")  # it appears, empty: a different failure
    proc = cli("label", manifest, out, "--config", NIGHTLY, "--json")
    summary = read_summary(proc)
    assert (summary["errors"], summary["still_failing"]) == (1, 0)
    assert proc.returncode == 1  # 1 of 1 new input failed
    kinds = _rows_of(out, "img/gone.jpg").sort_values("labeled_at").error_kind.tolist()
    assert kinds == ["not_found", "empty_file"]


# -- messages ----------------------------------------------------------------------------------

def test_first_run_says_it_converts_weights_and_the_second_does_not(cli_env, tmp_path):
    from conftest import run_cli

    _nightly_feed(tmp_path, photos=2)
    env = dict(cli_env, XDG_CACHE_HOME=str(tmp_path / "fresh-cache"))
    first = run_cli(["label", tmp_path / "img", tmp_path / "out"], env)
    assert first.returncode == 0, first.stderr
    assert "converting efficientnet_lite0 weights" in first.stderr
    assert "first run only" in first.stderr
    second = run_cli(["label", tmp_path / "img", tmp_path / "out2"], env)
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr


def test_top_k_above_the_class_count_is_clamped_with_a_warning_and_recorded(cli, tmp_path):
    import pyarrow.parquet as pq

    _nightly_feed(tmp_path, photos=2)
    proc = cli("label", tmp_path / "img", tmp_path / "out", "--top-k", "2000")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --top-k 2000 is more than the 1000 classes of efficientnet_lite0" in proc.stderr
    (part,) = (tmp_path / "out").glob("part-*.parquet")
    assert pq.read_schema(part).metadata[b"pipeline.top_k"] == b"1000"
    assert pq.read_table(part).column("labels").to_pylist()[0].__len__() == 1000
    (manifest,) = (tmp_path / "out" / "_runs").glob("*.json")
    assert json.loads(manifest.read_text())["config"]["top_k"] == 1000


def test_a_wrong_weights_file_is_one_clear_line(cli, tmp_path):
    from pipeline.tfimport import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    keras.applications.MobileNetV3Small(weights=None).save_weights(tmp_path / "other.weights.h5")
    _nightly_feed(tmp_path, photos=1)
    proc = cli("label", tmp_path / "img", tmp_path / "out", "--model", "mobilenet_v2",
               "--weights", tmp_path / "other.weights.h5")
    assert proc.returncode == 2, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr[:3000]
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr[:3000]  # "converting", error
    (error,) = [line for line in proc.stderr.splitlines() if " error: " in line]
    assert "does not hold mobilenet_v2 (MobileNetV2) ImageNet weights" in error
    assert "value.shape=(3, 3, 3, 16)" in error  # Keras' reason, not cut off
    assert error.endswith("a save_weights() file of that network")


def test_duplicate_manifest_ids_are_counted_in_the_plain_summary(cli, tmp_path):
    manifest = _nightly_feed(tmp_path, photos=2)
    with open(manifest, "a") as f:
        f.write("img/p00.jpg\n")
    proc = cli("label", manifest, tmp_path / "out", "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "duplicates: 1" in proc.stderr


# -- analysts: the current rows ----------------------------------------------------------------

def test_latest_gives_one_current_row_per_image_where_raw_rows_differ(cli, tmp_path):
    import duckdb
    import pyarrow as pa

    import pipeline

    manifest, out = _nightly_feed(tmp_path, photos=3), tmp_path / "out"
    assert cli("label", manifest, out, "--max-error-rate", "0.5").returncode == 0
    photo = tmp_path / "img" / "p01.jpg"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))  # changed
    (tmp_path / "img" / "gone.jpg").write_bytes(photo.read_bytes())  # the missing file arrives
    assert cli("label", manifest, out, "--max-error-rate", "0.5").returncode == 0

    raw = pd.read_parquet(out)
    assert len(raw) == 6  # 4 rows, then a relabel and the arrival: history is kept
    current = pipeline.latest(str(out))
    assert isinstance(current, pa.Table)
    assert current.column("image_id").to_pylist() == [
        "img/gone.jpg", "img/p00.jpg", "img/p01.jpg", "img/p02.jpg"]
    assert current.column("status").to_pylist() == ["ok"] * 4
    newest = raw.sort_values("labeled_at").groupby("image_id").tail(1).set_index("image_id")
    for row in current.to_pylist():
        assert row["run_id"] == newest.loc[row["image_id"], "run_id"]
    query = duckdb.sql(f"""SELECT image_id, run_id FROM '{out}/part-*.parquet'
        QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1
        ORDER BY image_id""").fetchall()
    assert query == list(zip(current.column("image_id").to_pylist(),
                             current.column("run_id").to_pylist()))
    assert pipeline.latest(str(out), columns=["image_id", "label"]).column_names == ["image_id", "label"]


def test_pandas_keeps_integer_sizes_with_the_documented_dtype_backend(cli, tmp_path):
    manifest, out = _nightly_feed(tmp_path, photos=2), tmp_path / "out"
    assert cli("label", manifest, out, "--max-error-rate", "0.5").returncode == 0
    assert pd.read_parquet(out).width.dtype == "float64"  # the error row has no width: NaN
    sizes = pd.read_parquet(out, dtype_backend="pyarrow")
    assert str(sizes.width.dtype) == "int32[pyarrow]"
    assert sizes.set_index("image_id").width.isna().to_dict() == {
        "img/p00.jpg": False, "img/p01.jpg": False, "img/gone.jpg": True}
    import pipeline
    arrow = pipeline.latest(str(out)).to_pandas(types_mapper=pd.ArrowDtype)
    assert str(arrow.height.dtype) == "int32[pyarrow]"


def test_latest_imports_no_tensorflow(cli_env, tmp_path):
    import subprocess
    import sys

    code = ("import sys, pipeline; t = pipeline.latest(sys.argv[1]); "
            "print(t.num_rows, 'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "False"]
