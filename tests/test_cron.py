"""Cron-grade behaviour through the CLI: exit codes a nightly job can trust, and clear messages."""
import json
import os
import re

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
    errors = [l for l in proc.stderr.splitlines() if "error: " in l]
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
