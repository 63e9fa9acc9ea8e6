"""Bundles: the directory format, its ModelSpec, the registry hook, and `label --model BUNDLE`.

The model here is a tiny real Keras network (32 px input) so these tests need no training.
"""
import hashlib
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.exitcodes import ConfigError
from pipeline.models import bundle, get
from pipeline.types import Labels
from pipeline.types import ModelRequest, Preprocess

CLASSES = ("indoor", "outdoor")
PRE = Preprocess(32, crop_fraction=None, resize="bilinear", mean=(127.5, 127.5, 127.5),
                 std=(127.5, 127.5, 127.5))


def tiny_model(outputs=None):
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(outputs or len(CLASSES), activation="softmax")(x))


def write_bundle(directory, outputs=None):
    directory.mkdir(parents=True, exist_ok=True)
    bundle.save(str(directory), tiny_model(outputs), Labels(CLASSES, CLASSES), PRE,
                {"val_accuracy": 1.0}, {"base_model": "tiny", "created_at": "now"})
    return directory


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundles") / "rooms-v1")


def test_save_writes_every_file_and_no_temp_files(tiny_bundle):
    names = sorted(os.listdir(tiny_bundle))
    assert names == ["bundle.json", "labels.json", "metrics.json", "model.keras", "preprocess.json"]
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    assert info["format"] == bundle.FORMAT and info["format_version"] == bundle.FORMAT_VERSION
    assert info["base_model"] == "tiny" and info["model_file"] == "model.keras"
    assert json.loads((tiny_bundle / "labels.json").read_text()) == {"ids": list(CLASSES),
                                                                      "names": list(CLASSES)}
    assert json.loads((tiny_bundle / "preprocess.json").read_text())["resize"] == "bilinear"


def test_spec_reads_labels_preprocessing_and_the_model(tiny_bundle):
    spec = bundle.bundle_spec(str(tiny_bundle), ModelRequest())
    assert spec.name == "rooms-v1"
    assert spec.labels == Labels(CLASSES, CLASSES)
    assert spec.preprocess == PRE  # tuples come back as tuples, so equality holds
    assert spec.weights_sha256 == sha256(tiny_bundle / "model.keras")
    assert str(tiny_bundle) in spec.weights_source
    assert spec.load_keras().output_shape == (None, 2)


def test_registry_resolves_a_bundle_path_and_still_rejects_unknown_names(tiny_bundle, tmp_path):
    assert get(ModelRequest(str(tiny_bundle))).name == "rooms-v1"
    assert get(ModelRequest(str(tiny_bundle) + "/")).name == "rooms-v1"
    with pytest.raises(ConfigError, match="not a SavedModel"):
        get(ModelRequest(str(tmp_path)))  # a directory that is neither a bundle nor a SavedModel
    with pytest.raises(ConfigError, match="unknown model"):
        get(ModelRequest("no_such_model"))


def test_unfinished_run_is_a_bundle_but_not_complete(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "state.json").write_text("{}")
    path = str(tmp_path / "run")
    assert bundle.is_bundle(path) and not bundle.is_complete(path)
    with pytest.raises(ConfigError, match="unfinished fine-tuning run.*--resume"):
        get(ModelRequest(path))


def test_model_file_comes_last_so_a_bundle_without_it_is_not_complete(tmp_path):
    path = write_bundle(tmp_path / "b")
    (path / "model.keras").unlink()
    assert bundle.is_bundle(str(path)) and not bundle.is_complete(str(path))


def test_weights_flag_and_mismatched_labels_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="--weights does not apply"):
        bundle.bundle_spec(str(tiny_bundle), ModelRequest(weights="/some/file.pth"))
    three = write_bundle(tmp_path / "three", outputs=3)
    with pytest.raises(ConfigError, match="3 outputs but labels.json lists 2"):
        bundle.bundle_spec(str(three), ModelRequest()).load_keras()


def test_newer_format_is_refused(tmp_path):
    path = write_bundle(tmp_path / "b")
    info = json.loads((path / "bundle.json").read_text())
    (path / "bundle.json").write_text(json.dumps(dict(info, format_version=99)))
    with pytest.raises(ConfigError, match="not a bundle format this version reads"):
        bundle.bundle_spec(str(path), ModelRequest())


def test_label_cli_with_a_bundle_needs_no_other_flag(cli, tiny_bundle, photos_dir, tmp_path):
    proc = cli("label", photos_dir, tmp_path / "out", "--model", tiny_bundle, "--json")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 5 and (df.status == "ok").all()
    assert set(df.label_id) <= set(CLASSES) and (df.label == df.label_id).all()
    assert all(sorted(ids) == sorted(CLASSES) for ids in df.label_ids)  # top-5 of 2 classes
    assert (df.model == "rooms-v1").all()
    meta = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert meta[b"pipeline.model"] == b"rooms-v1"
    assert meta[b"pipeline.weights_sha256"].decode() == sha256(tiny_bundle / "model.keras")
    assert json.loads(meta[b"pipeline.preprocessing"])["size"] == 32
